// Gathering a batch's per-request input rows into one contiguous buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sluice {

struct ConstSpan {
  const uint8_t* data;
  size_t size;
};

// Copies `parts` back to back into `dst`, which holds the sum of their sizes.
// Pure memcpy: callers may run it without any interpreter lock.
inline void GatherSpans(const std::vector<ConstSpan>& parts, uint8_t* dst) {
  for (const ConstSpan& p : parts) {
    if (p.size != 0) std::memcpy(dst, p.data, p.size);
    dst += p.size;
  }
}

}  // namespace sluice
