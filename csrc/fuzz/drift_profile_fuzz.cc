// libFuzzer target: the drift profile deserializer on arbitrary bytes (profile
// files are read from the model folder at load). The harness appends the FNV-1a
// checksum the format ends with, so the fuzzer explores the structure behind it
// rather than the checksum; a second pass feeds the raw input unchanged.
// Properties: no crash, no read out of bounds (ASan/UBSan), no unbounded
// allocation (-malloc_limit_mb), and a profile that parses serializes to bytes
// that parse again to the same feature count.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "sluice/drift.h"

namespace {

uint64_t Fnv1a64(const uint8_t* p, size_t n) {  // the public FNV-1a, 64-bit
  uint64_t h = 14695981039346656037ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ULL;
  }
  return h;
}

void Check(const uint8_t* data, size_t size) {
  sluice::drift::DriftProfile profile;
  if (!sluice::drift::DriftProfile::Deserialize(data, size, &profile).ok()) return;
  const std::string again = profile.Serialize();
  sluice::drift::DriftProfile twice;
  if (!sluice::drift::DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(again.data()),
                                                again.size(), &twice)
           .ok()) {
    std::abort();
  }
  if (twice.num_features() != profile.num_features()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Check(data, size);
  std::vector<uint8_t> sealed(data, data + size);
  const uint64_t h = Fnv1a64(data, size);
  for (int i = 0; i < 8; ++i) sealed.push_back(static_cast<uint8_t>(h >> (8 * i)));
  Check(sealed.data(), sealed.size());
  return 0;
}
