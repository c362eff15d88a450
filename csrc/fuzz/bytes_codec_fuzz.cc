// libFuzzer target: the BYTES wire codec on arbitrary client bytes.
// Input: byte 0..3 = element count hint (little endian, bounded), rest = payload.
// Properties: parsing never reads out of bounds (ASan), spans tile the payload
// exactly when it succeeds, and re-encoding the parsed elements gives back the
// same bytes; UTF-8 validation never crashes on any span.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "sluice/bytes_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t hint = 0;
  std::memcpy(&hint, data, 4);
  const uint8_t* payload = data + 4;
  const size_t payload_size = size - 4;
  // A client picks the count from the shape; bound it as the server does (the
  // payload cannot hold more elements than it has 4-byte prefixes).
  const size_t count = hint % (payload_size / 4 + 2);
  std::vector<sluice::ByteSpan> spans;
  const sluice::Status status = sluice::ParseLengthPrefixed(payload, payload_size, count, &spans);
  if (!status.ok()) return 0;
  if (spans.size() != count) std::abort();
  std::vector<std::string_view> elements;
  elements.reserve(spans.size());
  size_t expected_offset = 0;
  for (const sluice::ByteSpan& s : spans) {
    if (s.offset != expected_offset + 4 || s.offset + s.size > payload_size) std::abort();
    expected_offset = s.offset + s.size;
    std::string_view text(reinterpret_cast<const char*>(payload + s.offset), s.size);
    (void)sluice::IsValidUtf8(text);
    elements.push_back(text);
  }
  if (expected_offset != payload_size && count != 0) std::abort();
  const size_t encoded_size = sluice::LengthPrefixedSize(elements);
  if (encoded_size != payload_size && count != 0) std::abort();
  std::vector<uint8_t> out(encoded_size);
  if (!sluice::WriteLengthPrefixed(elements, out.data()).ok()) std::abort();
  if (count != 0 && std::memcmp(out.data(), payload, payload_size) != 0) std::abort();
  return 0;
}
