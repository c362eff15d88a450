// The wire form of BYTES tensors (KServe v2 raw contents, Triton's binary
// tensor extension): each element is a 4-byte little-endian unsigned length
// followed by that many bytes, elements back to back, no padding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "sluice/status.h"

namespace sluice {

struct ByteSpan {
  size_t offset;  // into the parsed buffer
  size_t size;
};

// Splits `data` into exactly `expected_count` elements. The spans point into
// `data`, which the caller keeps alive. Fails with InvalidArgument naming the
// element and the byte offset when a length prefix is truncated, a length
// runs past the end, or bytes are left over.
Status ParseLengthPrefixed(const uint8_t* data, size_t size, size_t expected_count,
                           std::vector<ByteSpan>* spans);

// Bytes needed to serialize `elements`.
size_t LengthPrefixedSize(const std::vector<std::string_view>& elements);

// Writes `elements` to `out`, which holds LengthPrefixedSize(elements) bytes.
// Fails if an element is 4 GiB or longer (it cannot be length-prefixed).
Status WriteLengthPrefixed(const std::vector<std::string_view>& elements, uint8_t* out);

// Whether `text` is well-formed UTF-8 (onnxruntime string tensors hold text).
bool IsValidUtf8(std::string_view text);

}  // namespace sluice
