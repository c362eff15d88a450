#include "sluice/bytes_codec.h"

#include <cstring>
#include <limits>
#include <string>

namespace sluice {
namespace {

constexpr size_t kPrefixBytes = 4;

uint32_t LoadLe32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

void StoreLe32(uint32_t v, uint8_t* p) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

}  // namespace

Status ParseLengthPrefixed(const uint8_t* data, size_t size, size_t expected_count,
                           std::vector<ByteSpan>* spans) {
  spans->clear();
  // Each element needs at least its prefix, which bounds the reservation by
  // the buffer rather than by a count the client chose.
  spans->reserve(std::min(expected_count, size / kPrefixBytes));
  size_t pos = 0;
  for (size_t i = 0; i < expected_count; ++i) {
    if (size - pos < kPrefixBytes) {
      return Status::InvalidArgument(
          "BYTES element " + std::to_string(i) + " of " + std::to_string(expected_count) +
          ": length prefix truncated at byte " + std::to_string(pos) + " of " +
          std::to_string(size));
    }
    const size_t len = LoadLe32(data + pos);
    pos += kPrefixBytes;
    if (len > size - pos) {
      return Status::InvalidArgument(
          "BYTES element " + std::to_string(i) + " declares " + std::to_string(len) +
          " bytes but only " + std::to_string(size - pos) + " remain");
    }
    spans->push_back(ByteSpan{pos, len});
    pos += len;
  }
  if (pos != size) {
    return Status::InvalidArgument("BYTES data holds " + std::to_string(size - pos) +
                                   " bytes after the expected " +
                                   std::to_string(expected_count) + " elements");
  }
  return Status::Ok();
}

size_t LengthPrefixedSize(const std::vector<std::string_view>& elements) {
  size_t total = 0;
  for (const auto& e : elements) total += kPrefixBytes + e.size();
  return total;
}

Status WriteLengthPrefixed(const std::vector<std::string_view>& elements, uint8_t* out) {
  for (size_t i = 0; i < elements.size(); ++i) {
    const auto& e = elements[i];
    if (e.size() > std::numeric_limits<uint32_t>::max()) {
      return Status::InvalidArgument("BYTES element " + std::to_string(i) +
                                     " is too long for a 4-byte length prefix");
    }
    StoreLe32(static_cast<uint32_t>(e.size()), out);
    out += kPrefixBytes;
    if (!e.empty()) std::memcpy(out, e.data(), e.size());
    out += e.size();
  }
  return Status::Ok();
}

bool IsValidUtf8(std::string_view text) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t extra;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      extra = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (n - i <= extra) return false;
    for (size_t k = 1; k <= extra; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    // Reject overlong forms, UTF-16 surrogates and code points past U+10FFFF.
    static constexpr uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += extra + 1;
  }
  return true;
}

}  // namespace sluice
