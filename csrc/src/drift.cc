#include "sluice/drift.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace sluice::drift {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kDoubleMax = std::numeric_limits<double>::max();
constexpr uint32_t kFormatVersion = 1;
constexpr char kMagic[4] = {'S', 'L', 'D', 'P'};
constexpr size_t kMaxCells = 32768;
constexpr int32_t kMaxTailLevels = 24;
// Rows per block of the update: the scratch (cell index + value) stays in L1.
constexpr size_t kBlockRows = 512;
// int64 range as doubles: [-2^63, 2^63).
constexpr double kInt64Lo = -9223372036854775808.0;
constexpr double kInt64Hi = 9223372036854775808.0;

bool IsFinite(double x) { return std::fabs(x) <= kDoubleMax; }

// Compensated sum with Knuth's branch-free TwoSum: the rounding error of every
// addition is accumulated exactly, so the reference moments are accurate for any
// n (and no data-dependent branch mispredicts on random data).
class CompensatedSum {
 public:
  void Add(double x) {
    const double t = sum_ + x;
    const double bp = t - sum_;
    comp_ += (sum_ - (t - bp)) + (x - bp);
    sum_ = t;
  }
  double Value() const { return sum_ + comp_; }

 private:
  double sum_ = 0;
  double comp_ = 0;
};

template <typename T>
double ToDouble(T v) {
  return static_cast<double>(v);
}

// Calls fn(const T* base) with the matrix's element type.
template <typename Fn>
Status DispatchDType(DType dtype, const void* data, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(static_cast<const float*>(data)); return Status::Ok();
    case DType::kFloat64: fn(static_cast<const double*>(data)); return Status::Ok();
    case DType::kInt8: fn(static_cast<const int8_t*>(data)); return Status::Ok();
    case DType::kInt16: fn(static_cast<const int16_t*>(data)); return Status::Ok();
    case DType::kInt32: fn(static_cast<const int32_t*>(data)); return Status::Ok();
    case DType::kInt64: fn(static_cast<const int64_t*>(data)); return Status::Ok();
    case DType::kUInt8: fn(static_cast<const uint8_t*>(data)); return Status::Ok();
    case DType::kUInt16: fn(static_cast<const uint16_t*>(data)); return Status::Ok();
    case DType::kUInt32: fn(static_cast<const uint32_t*>(data)); return Status::Ok();
    case DType::kUInt64: fn(static_cast<const uint64_t*>(data)); return Status::Ok();
    case DType::kBool: fn(static_cast<const uint8_t*>(data)); return Status::Ok();
  }
  return Status::InvalidArgument("unsupported dtype");
}

Status CheckMatrix(const MatrixView& m, const char* what) {
  if (m.rows > 0 && m.cols > 0 && m.data == nullptr) {
    return Status::InvalidArgument(std::string(what) + ": null data");
  }
  if (static_cast<uint8_t>(m.dtype) > static_cast<uint8_t>(DType::kBool)) {
    return Status::InvalidArgument(std::string(what) + ": unsupported dtype");
  }
  return Status::Ok();
}

// ---- Profile building --------------------------------------------------------

// Sorts finite doubles ascending: LSD radix sort over the order-preserving
// 64-bit pattern (sign bit flipped for >= 0, all bits for < 0), 11-bit digits,
// skipping digits that all keys share. About 5x faster than std::sort at 1e5.
void SortFinite(std::vector<double>* values) {
  std::vector<double>& v = *values;
  const size_t n = v.size();
  if (n < 1024 || n > std::numeric_limits<uint32_t>::max()) {
    std::sort(v.begin(), v.end());
    return;
  }
  std::vector<uint64_t> keys(n), tmp(n);
  for (size_t i = 0; i < n; ++i) {
    uint64_t bits;
    std::memcpy(&bits, &v[i], sizeof bits);
    keys[i] = (bits >> 63) ? ~bits : bits | (uint64_t{1} << 63);
  }
  constexpr int kDigitBits = 11;
  constexpr int kDigits = 6;  // 6 x 11 >= 64
  constexpr size_t kBuckets = size_t{1} << kDigitBits;
  // All digit histograms in one pass, then one scatter per digit that varies.
  std::vector<uint32_t> count(kDigits * kBuckets, 0);
  for (uint64_t k : keys) {
    for (int d = 0; d < kDigits; ++d) {
      ++count[static_cast<size_t>(d) * kBuckets + ((k >> (d * kDigitBits)) & (kBuckets - 1))];
    }
  }
  for (int d = 0; d < kDigits; ++d) {
    uint32_t* c = count.data() + static_cast<size_t>(d) * kBuckets;
    const int shift = d * kDigitBits;
    if (c[(keys[0] >> shift) & (kBuckets - 1)] == n) continue;  // one digit value
    uint32_t sum = 0;
    for (size_t b = 0; b < kBuckets; ++b) {
      const uint32_t here = c[b];
      c[b] = sum;
      sum += here;
    }
    for (uint64_t k : keys) tmp[c[(k >> shift) & (kBuckets - 1)]++] = k;
    keys.swap(tmp);
  }
  for (size_t i = 0; i < n; ++i) {
    const uint64_t k = keys[i];
    const uint64_t bits = (k >> 63) ? k & ~(uint64_t{1} << 63) : ~k;
    std::memcpy(&v[i], &bits, sizeof bits);
  }
}

// Sorted finite values of a column, and how many were not finite.
template <typename T>
void CollectFinite(const T* base, size_t stride, size_t count, std::vector<double>* out,
                   uint64_t* nonfinite) {
  out->clear();
  out->reserve(count);
  uint64_t bad = 0;
  for (size_t i = 0; i < count; ++i) {
    const double x = ToDouble(base[i * stride]);
    if (IsFinite(x)) {
      out->push_back(x);
    } else {
      ++bad;
    }
  }
  *nonfinite = bad;
}

// Distinct quantiles of sorted data at k/denominator for k in [first, last].
std::vector<double> DistinctQuantiles(const std::vector<double>& sorted, int32_t denominator,
                                      int32_t first, int32_t last) {
  std::vector<double> out;
  out.reserve(static_cast<size_t>(last - first + 1));
  for (int32_t k = first; k <= last; ++k) {
    const double q = static_cast<double>(k) / static_cast<double>(denominator);
    const double v = QuantileSorted(sorted.data(), sorted.size(), q);
    if (out.empty() || v > out.back()) out.push_back(v);
  }
  return out;
}

// Tail refinement of the sketch: levels i = 1..L add the quantiles at
// 2^-i / G and 1 - 2^-i / G while at least one order statistic separates them
// ((n - 1) * 2^-i / G >= 1), so the outermost fine bins hold about one
// reference value instead of n/G (W1 on heavy tails depends on them).
int32_t TailLevels(size_t n, int32_t g) {
  int32_t levels = 0;
  while (levels < kMaxTailLevels &&
         static_cast<double>(n - 1) * std::ldexp(1.0 / g, -(levels + 1)) >= 1.0) {
    ++levels;
  }
  return levels;
}

Status BuildNumericFromSorted(std::vector<double>& sorted, uint64_t nonfinite,
                              const ProfileOptions& options, NumericProfile* out) {
  if (options.bins < 2 || options.bins > kMaxBins) {
    return Status::InvalidArgument("bins must be in [2, " + std::to_string(kMaxBins) + "], got " +
                                   std::to_string(options.bins));
  }
  if (options.sketch_points < 1 || options.sketch_points > kMaxSketchPoints) {
    return Status::InvalidArgument("sketch_points must be in [1, " +
                                   std::to_string(kMaxSketchPoints) + "], got " +
                                   std::to_string(options.sketch_points));
  }
  const int32_t b = options.bins;
  int32_t g = ((options.sketch_points + b - 1) / b) * b;
  if (g > kMaxSketchPoints) g = (kMaxSketchPoints / b) * b;

  NumericProfile p;
  p.bins = b;
  p.sketch_points = g;
  p.n = sorted.size();
  p.nonfinite = nonfinite;
  if (sorted.empty()) {
    p.mean = p.m2 = p.min = p.max = kNaN;
    p.counts = {0};
    p.sketch_counts = {0};
    p.sketch_sums = {0.0};
    *out = std::move(p);
    return Status::Ok();
  }
  SortFinite(&sorted);
  CompensatedSum sum;
  for (double x : sorted) sum.Add(x);
  p.mean = sum.Value() / static_cast<double>(p.n);
  CompensatedSum m2;
  for (double x : sorted) m2.Add((x - p.mean) * (x - p.mean));
  p.m2 = m2.Value();
  p.min = sorted.front();
  p.max = sorted.back();

  p.edges = DistinctQuantiles(sorted, b, 1, b - 1);
  // Fine grid: min, the lower tail levels, j/G for j = 1..G-1, the upper tail
  // levels, then nextafter(max). Probabilities increase along the list, so the
  // quantiles do too; equal neighbours are dropped.
  std::vector<double> probs = {0.0};
  const int32_t levels = TailLevels(sorted.size(), g);
  for (int32_t i = levels; i >= 1; --i) probs.push_back(std::ldexp(1.0 / g, -i));
  for (int32_t j = 1; j < g; ++j) probs.push_back(static_cast<double>(j) / static_cast<double>(g));
  for (int32_t i = 1; i <= levels; ++i) probs.push_back(1.0 - std::ldexp(1.0 / g, -i));
  for (double q : probs) {
    const double v = QuantileSorted(sorted.data(), sorted.size(), q);
    if (p.sketch_edges.empty() || v > p.sketch_edges.back()) p.sketch_edges.push_back(v);
  }
  p.sketch_edges.push_back(std::nextafter(p.max, kInf));

  // Coarse counts: bin i = [edges[i-1], edges[i]) with +-inf outside.
  p.counts.assign(p.edges.size() + 1, 0);
  size_t pos = 0;
  for (size_t i = 0; i < p.edges.size(); ++i) {
    const size_t end = static_cast<size_t>(
        std::lower_bound(sorted.begin() + static_cast<std::ptrdiff_t>(pos), sorted.end(),
                         p.edges[i]) -
        sorted.begin());
    p.counts[i] = end - pos;
    pos = end;
  }
  p.counts.back() = sorted.size() - pos;

  // Fine counts and anchored sums. Bin 0 (< min) and the last bin (> max) are
  // empty for the reference by construction.
  const size_t s = p.sketch_edges.size();
  p.sketch_counts.assign(s + 1, 0);
  p.sketch_sums.assign(s + 1, 0.0);
  pos = 0;
  for (size_t j = 1; j <= s; ++j) {
    const double left = p.sketch_edges[j - 1];
    const double right = j < s ? p.sketch_edges[j] : kInf;
    // Offsets within one fine bin: small, same-signed terms; a plain sum is
    // accurate to ~count * 1e-16 relative.
    double bin_sum = 0;
    size_t k = pos;
    while (k < sorted.size() && sorted[k] < right) {
      bin_sum += sorted[k] - left;
      ++k;
    }
    p.sketch_counts[j] = k - pos;
    p.sketch_sums[j] = bin_sum;
    pos = k;
  }
  *out = std::move(p);
  return Status::Ok();
}

Status CategoricalFromCodes(std::vector<int64_t>& codes, uint64_t missing,
                            CategoricalProfile* out) {
  CategoricalProfile p;
  p.n = codes.size();
  p.missing = missing;
  std::sort(codes.begin(), codes.end());
  for (size_t i = 0; i < codes.size();) {
    size_t j = i;
    while (j < codes.size() && codes[j] == codes[i]) ++j;
    p.codes.push_back(codes[i]);
    p.counts.push_back(j - i);
    i = j;
  }
  *out = std::move(p);
  return Status::Ok();
}

// Column of any dtype -> integer codes; NaN is missing, other values must be
// integral and within int64.
template <typename T>
Status CollectCodes(const T* base, size_t stride, size_t count, std::vector<int64_t>* codes,
                    uint64_t* missing) {
  codes->clear();
  codes->reserve(count);
  uint64_t nan = 0;
  for (size_t i = 0; i < count; ++i) {
    const T v = base[i * stride];
    if constexpr (std::is_floating_point_v<T>) {
      const double x = static_cast<double>(v);
      if (std::isnan(x)) {
        ++nan;
        continue;
      }
      if (!(x >= kInt64Lo && x < kInt64Hi) || std::trunc(x) != x) {
        return Status::InvalidArgument("categorical value " + std::to_string(x) +
                                       " at row " + std::to_string(i) +
                                       " is not an integer code");
      }
      codes->push_back(static_cast<int64_t>(x));
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Status::InvalidArgument("categorical code at row " + std::to_string(i) +
                                       " exceeds int64");
      }
      codes->push_back(static_cast<int64_t>(v));
    } else {
      codes->push_back(static_cast<int64_t>(v));
    }
  }
  *missing = nan;
  return Status::Ok();
}

// ---- Derived lookup structures -----------------------------------------------

// The cell of x in the uniform grid over [lo, lo + cells/inv_width): a
// non-decreasing function of x (NaN intermediate -> cell 0), shared by the
// index build and the update so that both agree bit for bit.
inline size_t CellOf(double x, double lo, double inv_width, double last_cell) {
  double u = (x - lo) * inv_width;
  u = u > 0 ? u : 0;
  u = u < last_cell ? u : last_cell;
  return static_cast<size_t>(u);
}

int32_t StepsFor(size_t max_per_cell) {
  int32_t s = 0;
  while ((size_t{1} << s) < max_per_cell + 1) ++s;
  return s;
}

NumericIndex BuildNumericIndex(const NumericProfile& p) {
  NumericIndex ix;
  const std::vector<double>& e = p.sketch_edges;
  const size_t count = e.size();
  ix.fine_bins = count + 1;
  const size_t junk = count + 1;
  size_t cells = 1;
  if (count > 0) {
    cells = std::min(kMaxCells, std::max<size_t>(16, 8 * count));
    // Pick the trimmed range [e[k], e[count-1-k]] that needs the fewest search
    // steps (heavy tails: trimming spreads the dense middle over more cells).
    int32_t best_steps = std::numeric_limits<int32_t>::max();
    for (size_t k = 0;; k = k == 0 ? 1 : 2 * k) {
      if (k > 0 && 2 * k + 2 > count) break;
      const double lo = e[k];
      const double hi = e[count - 1 - k];
      double inv = hi > lo ? static_cast<double>(cells) / (hi - lo) : 0.0;
      if (!(inv > 0 && inv <= kDoubleMax)) inv = 0.0;
      const double last = static_cast<double>(cells - 1);
      size_t run = 0, max_run = 0, prev = 0;
      for (size_t j = 0; j < count; ++j) {
        const size_t c = CellOf(e[j], lo, inv, last);
        run = (j > 0 && c == prev) ? run + 1 : 1;
        prev = c;
        max_run = std::max(max_run, run);
      }
      const int32_t steps = StepsFor(max_run);
      if (steps < best_steps) {
        best_steps = steps;
        ix.lo = lo;
        ix.inv_width = inv;
        ix.last_cell = last;
      }
      if (k == 0 && count < 4) break;
    }
    ix.steps = best_steps;
  }
  ix.cells.assign(cells + 1, 0);
  {
    size_t j = 0;
    for (size_t c = 0; c < cells; ++c) {
      // First fine bin of cell c = number of edges in cells < c.
      while (j < count && CellOf(e[j], ix.lo, ix.inv_width, ix.last_cell) < c) ++j;
      ix.cells[c] = static_cast<uint16_t>(j);
    }
    ix.cells[cells] = static_cast<uint16_t>(junk);
  }
  ix.edges.assign(junk + 1 + (size_t{1} << ix.steps), kInf);
  std::copy(e.begin(), e.end(), ix.edges.begin());
  ix.anchors.assign(junk + 1, 0.0);
  for (size_t j = 0; j <= count && count > 0; ++j) ix.anchors[j] = e[j == 0 ? 0 : j - 1];
  ix.fine_to_coarse.assign(ix.fine_bins, 0);
  for (size_t j = 1; j < ix.fine_bins; ++j) {
    ix.fine_to_coarse[j] = static_cast<uint16_t>(
        std::upper_bound(p.edges.begin(), p.edges.end(), e[j - 1]) - p.edges.begin());
  }
  return ix;
}

CategoricalIndex BuildCategoricalIndex(const CategoricalProfile& p) {
  CategoricalIndex ix;
  if (p.codes.empty()) return ix;
  const uint64_t span =
      static_cast<uint64_t>(p.codes.back()) - static_cast<uint64_t>(p.codes.front());
  if (span < std::max<uint64_t>(1024, 4 * p.codes.size())) {
    ix.base = p.codes.front();
    ix.dense.assign(static_cast<size_t>(span) + 1, static_cast<uint32_t>(p.codes.size()));
    for (size_t i = 0; i < p.codes.size(); ++i) {
      ix.dense[static_cast<size_t>(static_cast<uint64_t>(p.codes[i]) -
                                   static_cast<uint64_t>(ix.base))] = static_cast<uint32_t>(i);
    }
  }
  return ix;
}

// ---- Serialisation helpers ------------------------------------------------------

class Writer {
 public:
  void Bytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  }
  void U64(uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  }
  void I32(int32_t v) { U32(static_cast<uint32_t>(v)); }
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F64(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    U64(bits);
  }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  bool Need(size_t k) {
    if (n_ - pos_ < k) {
      ok_ = false;
      return false;
    }
    return true;
  }
  uint8_t U8() { return Need(1) ? p_[pos_++] : 0; }
  uint32_t U32() {
    if (!Need(4)) return 0;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p_[pos_++]) << (8 * i);
    return v;
  }
  uint64_t U64() {
    if (!Need(8)) return 0;
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p_[pos_++]) << (8 * i);
    return v;
  }
  int32_t I32() { return static_cast<int32_t>(U32()); }
  int64_t I64() { return static_cast<int64_t>(U64()); }
  double F64() {
    const uint64_t bits = U64();
    double v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
  // A length prefix k of a block of k * elem + extra bytes, checked against
  // what remains.
  bool Count(size_t elem, size_t extra, size_t* count) {
    const uint32_t k = U32();
    if (!ok_ || static_cast<uint64_t>(k) * elem + extra > n_ - pos_) {
      ok_ = false;
      return false;
    }
    *count = k;
    return true;
  }
  bool ok() const { return ok_; }
  size_t pos() const { return pos_; }
  const uint8_t* here() const { return p_ + pos_; }
  void Skip(size_t k) {
    if (Need(k)) pos_ += k;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  bool ok_ = true;
};

uint64_t Fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ULL;
  }
  return h;
}

}  // namespace

// ---- Public helpers -------------------------------------------------------------

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
    case DType::kInt64:
    case DType::kUInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32:
    case DType::kUInt32: return 4;
    case DType::kInt16:
    case DType::kUInt16: return 2;
    case DType::kInt8:
    case DType::kUInt8:
    case DType::kBool: return 1;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kInt8: return "int8";
    case DType::kInt16: return "int16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kUInt16: return "uint16";
    case DType::kUInt32: return "uint32";
    case DType::kUInt64: return "uint64";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

double QuantileSorted(const double* sorted, size_t n, double q) {
  if (n == 0) return kNaN;
  const double h = static_cast<double>(n - 1) * q;
  if (!(h < static_cast<double>(n - 1))) return sorted[n - 1];
  if (!(h >= 0)) return sorted[0];
  const double lower = std::floor(h);
  const size_t i = static_cast<size_t>(lower);
  const double gamma = h - lower;
  const double a = sorted[i];
  const double b = sorted[i + 1];
  if (gamma == 0) return a;
  const double diff = b - a;
  // numpy's _lerp: from the nearer end, so that gamma near 1 returns ~b exactly.
  return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
}

double NumericProfile::variance() const {
  return n == 0 ? kNaN : m2 / static_cast<double>(n);
}

double NumericProfile::stddev() const { return std::sqrt(variance()); }

Status NumericProfile::Build(const double* values, size_t count, const ProfileOptions& options,
                             NumericProfile* out) {
  if (count > 0 && values == nullptr) return Status::InvalidArgument("null values");
  std::vector<double> finite;
  uint64_t nonfinite = 0;
  CollectFinite(values, 1, count, &finite, &nonfinite);
  return BuildNumericFromSorted(finite, nonfinite, options, out);
}

Status NumericProfile::Validate() const {
  auto bad = [](const std::string& what) {
    return Status::InvalidArgument("numeric profile: " + what);
  };
  if (bins < 2 || bins > kMaxBins) return bad("bins out of range");
  if (sketch_points < 1 || sketch_points > kMaxSketchPoints) return bad("sketch_points out of range");
  if (edges.size() + 1 != counts.size()) return bad("counts size");
  if (edges.size() > static_cast<size_t>(bins - 1)) return bad("too many edges");
  if (sketch_edges.size() > static_cast<size_t>(sketch_points) + 1 + 2 * kMaxTailLevels) {
    return bad("too many sketch edges");
  }
  if (sketch_counts.size() != sketch_edges.size() + 1 ||
      sketch_sums.size() != sketch_edges.size() + 1) {
    return bad("sketch sizes");
  }
  for (size_t i = 0; i < edges.size(); ++i) {
    if (!IsFinite(edges[i]) || (i > 0 && !(edges[i] > edges[i - 1]))) return bad("edges not increasing");
  }
  for (size_t i = 0; i < sketch_edges.size(); ++i) {
    if (std::isnan(sketch_edges[i]) || (i > 0 && !(sketch_edges[i] > sketch_edges[i - 1]))) {
      return bad("sketch edges not increasing");
    }
  }
  uint64_t total = 0, fine_total = 0;
  for (uint64_t c : counts) total += c;
  for (uint64_t c : sketch_counts) fine_total += c;
  if (total != n || fine_total != n) return bad("counts do not sum to n");
  if (n == 0) {
    if (!edges.empty() || !sketch_edges.empty()) return bad("edges without data");
    return Status::Ok();
  }
  if (sketch_edges.size() < 2 || !IsFinite(min) || !IsFinite(max) || !(min <= max) ||
      sketch_edges.front() != min || !(sketch_edges.back() > max) || !IsFinite(mean) ||
      !(m2 >= 0)) {
    return bad("min/max/moments inconsistent");
  }
  if (sketch_counts.front() != 0 || sketch_counts.back() != 0) return bad("reference tail counts");
  for (double e : edges) {
    if (!std::binary_search(sketch_edges.begin(), sketch_edges.end(), e)) {
      return bad("coarse edge missing from the sketch grid");
    }
  }
  return Status::Ok();
}

Status CategoricalProfile::Build(const int64_t* codes_in, size_t count, CategoricalProfile* out) {
  if (count > 0 && codes_in == nullptr) return Status::InvalidArgument("null codes");
  std::vector<int64_t> codes(codes_in, codes_in + count);
  return CategoricalFromCodes(codes, 0, out);
}

Status CategoricalProfile::Validate() const {
  if (codes.size() != counts.size()) return Status::InvalidArgument("categorical profile: sizes");
  if (codes.size() >= std::numeric_limits<uint32_t>::max()) {
    return Status::InvalidArgument("categorical profile: too many categories");
  }
  uint64_t total = 0;
  for (size_t i = 0; i < codes.size(); ++i) {
    if (counts[i] == 0 || (i > 0 && codes[i] <= codes[i - 1])) {
      return Status::InvalidArgument("categorical profile: codes not sorted/unique or empty count");
    }
    total += counts[i];
  }
  if (total != n) return Status::InvalidArgument("categorical profile: counts do not sum to n");
  return Status::Ok();
}

// ---- DriftProfile ------------------------------------------------------------------

Status DriftProfile::Build(const MatrixView& data, const std::vector<FeatureKind>& kinds,
                           const std::vector<std::string>& names, const ProfileOptions& options,
                           DriftProfile* out) {
  Status st = CheckMatrix(data, "reference");
  if (!st.ok()) return st;
  if (data.cols == 0) return Status::InvalidArgument("reference has no columns");
  if (!kinds.empty() && kinds.size() != data.cols) {
    return Status::InvalidArgument("kinds has " + std::to_string(kinds.size()) +
                                   " entries for " + std::to_string(data.cols) + " columns");
  }
  if (!names.empty() && names.size() != data.cols) {
    return Status::InvalidArgument("names has " + std::to_string(names.size()) +
                                   " entries for " + std::to_string(data.cols) + " columns");
  }
  std::vector<FeatureProfile> features(data.cols);
  std::vector<double> values;
  std::vector<int64_t> codes;
  for (size_t c = 0; c < data.cols && st.ok(); ++c) {
    FeatureProfile& f = features[c];
    f.kind = kinds.empty() ? FeatureKind::kNumeric : kinds[c];
    if (!names.empty()) f.name = names[c];
    Status inner;
    st = DispatchDType(data.dtype, data.data, [&](const auto* base) {
      if (f.kind == FeatureKind::kNumeric) {
        uint64_t nonfinite = 0;
        CollectFinite(base + c, data.cols, data.rows, &values, &nonfinite);
        inner = BuildNumericFromSorted(values, nonfinite, options, &f.numeric);
      } else {
        uint64_t missing = 0;
        inner = CollectCodes(base + c, data.cols, data.rows, &codes, &missing);
        if (inner.ok()) inner = CategoricalFromCodes(codes, missing, &f.categorical);
      }
    });
    if (st.ok()) st = inner;
    if (!st.ok()) st = Status::InvalidArgument("column " + std::to_string(c) + ": " + st.message());
  }
  if (!st.ok()) return st;
  return FromFeatures(std::move(features), out);
}

Status DriftProfile::FromFeatures(std::vector<FeatureProfile> features, DriftProfile* out) {
  DriftProfile p;
  p.features_ = std::move(features);
  Status st = p.Finish();
  if (!st.ok()) return st;
  *out = std::move(p);
  return Status::Ok();
}

Status DriftProfile::Finish() {
  if (features_.empty()) return Status::InvalidArgument("profile has no features");
  numeric_index_.assign(features_.size(), NumericIndex());
  categorical_index_.assign(features_.size(), CategoricalIndex());
  for (size_t i = 0; i < features_.size(); ++i) {
    const FeatureProfile& f = features_[i];
    Status st;
    if (f.kind == FeatureKind::kNumeric) {
      st = f.numeric.Validate();
      if (st.ok()) numeric_index_[i] = BuildNumericIndex(f.numeric);
    } else if (f.kind == FeatureKind::kCategorical) {
      st = f.categorical.Validate();
      if (st.ok()) categorical_index_[i] = BuildCategoricalIndex(f.categorical);
    } else {
      st = Status::InvalidArgument("unknown feature kind");
    }
    if (!st.ok()) return Status::InvalidArgument("feature " + std::to_string(i) + ": " + st.message());
  }
  return Status::Ok();
}

std::string DriftProfile::Serialize() const {
  Writer w;
  w.Bytes(kMagic, 4);
  w.U32(kFormatVersion);
  w.U32(static_cast<uint32_t>(features_.size()));
  for (const FeatureProfile& f : features_) {
    w.U8(static_cast<uint8_t>(f.kind));
    w.U32(static_cast<uint32_t>(f.name.size()));
    w.Bytes(f.name.data(), f.name.size());
    if (f.kind == FeatureKind::kNumeric) {
      const NumericProfile& p = f.numeric;
      w.I32(p.bins);
      w.I32(p.sketch_points);
      w.U64(p.n);
      w.U64(p.nonfinite);
      w.F64(p.mean);
      w.F64(p.m2);
      w.F64(p.min);
      w.F64(p.max);
      w.U32(static_cast<uint32_t>(p.edges.size()));
      for (double e : p.edges) w.F64(e);
      for (uint64_t c : p.counts) w.U64(c);
      w.U32(static_cast<uint32_t>(p.sketch_edges.size()));
      for (double e : p.sketch_edges) w.F64(e);
      for (uint64_t c : p.sketch_counts) w.U64(c);
      for (double s : p.sketch_sums) w.F64(s);
    } else {
      const CategoricalProfile& p = f.categorical;
      w.U64(p.n);
      w.U64(p.missing);
      w.U32(static_cast<uint32_t>(p.codes.size()));
      for (int64_t c : p.codes) w.I64(c);
      for (uint64_t c : p.counts) w.U64(c);
    }
  }
  const std::string& s = w.str();
  w.U64(Fnv1a(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  return std::move(w.str());
}

Status DriftProfile::Deserialize(const uint8_t* data, size_t size, DriftProfile* out) {
  auto bad = [](const std::string& what) {
    return Status::InvalidArgument("drift profile bytes: " + what);
  };
  if (size < 20 || data == nullptr || std::memcmp(data, kMagic, 4) != 0) return bad("bad magic");
  uint64_t stored = 0;
  for (int i = 0; i < 8; ++i) stored |= static_cast<uint64_t>(data[size - 8 + static_cast<size_t>(i)]) << (8 * i);
  if (stored != Fnv1a(data, size - 8)) return bad("checksum mismatch (corrupt or truncated)");
  Reader r(data, size - 8);
  r.Skip(4);
  const uint32_t version = r.U32();
  if (version != kFormatVersion) return bad("unsupported version " + std::to_string(version));
  const uint32_t nfeat = r.U32();
  std::vector<FeatureProfile> features;
  for (uint32_t i = 0; i < nfeat && r.ok(); ++i) {
    FeatureProfile f;
    const uint8_t kind = r.U8();
    if (kind > 1) return bad("unknown feature kind");
    f.kind = static_cast<FeatureKind>(kind);
    size_t len = 0;
    if (!r.Count(1, 0, &len)) break;
    f.name.assign(reinterpret_cast<const char*>(r.here()), len);
    r.Skip(len);
    size_t k = 0;
    if (f.kind == FeatureKind::kNumeric) {
      NumericProfile& p = f.numeric;
      p.bins = r.I32();
      p.sketch_points = r.I32();
      p.n = r.U64();
      p.nonfinite = r.U64();
      p.mean = r.F64();
      p.m2 = r.F64();
      p.min = r.F64();
      p.max = r.F64();
      if (!r.Count(16, 8, &k)) break;  // edges, counts (k + 1)
      p.edges.resize(k);
      for (double& e : p.edges) e = r.F64();
      p.counts.resize(k + 1);
      for (uint64_t& c : p.counts) c = r.U64();
      if (!r.Count(24, 16, &k)) break;  // edges, counts and sums (k + 1)
      p.sketch_edges.resize(k);
      for (double& e : p.sketch_edges) e = r.F64();
      p.sketch_counts.resize(k + 1);
      for (uint64_t& c : p.sketch_counts) c = r.U64();
      p.sketch_sums.resize(k + 1);
      for (double& s : p.sketch_sums) s = r.F64();
    } else {
      CategoricalProfile& p = f.categorical;
      p.n = r.U64();
      p.missing = r.U64();
      if (!r.Count(16, 0, &k)) break;
      p.codes.resize(k);
      for (int64_t& c : p.codes) c = r.I64();
      p.counts.resize(k);
      for (uint64_t& c : p.counts) c = r.U64();
    }
    features.push_back(std::move(f));
  }
  if (!r.ok()) return bad("truncated");
  if (r.pos() != size - 8) return bad("trailing bytes");
  return FromFeatures(std::move(features), out);
}

// ---- Statistics on counts ---------------------------------------------------------

BinnedDistances CompareCounts(const uint64_t* ref, const uint64_t* cur, size_t k, double eps) {
  uint64_t n = 0, m = 0;
  for (size_t i = 0; i < k; ++i) {
    n += ref[i];
    m += cur[i];
  }
  if (n == 0 || m == 0) return {kNaN, kNaN, kNaN, kNaN, kNaN};
  const double dn = static_cast<double>(n), dm = static_cast<double>(m);
  double psi = 0, kl = 0, js = 0, hel = 0, tvd = 0;
  for (size_t i = 0; i < k; ++i) {
    const double r = static_cast<double>(ref[i]) / dn;
    const double c = static_cast<double>(cur[i]) / dm;
    const double re = r > 0 ? r : eps;
    const double ce = c > 0 ? c : eps;
    psi += (ce - re) * std::log(ce / re);
    kl += re * std::log(re / ce);
    const double mid = 0.5 * (r + c);
    if (r > 0) js += r * std::log(r / mid);
    if (c > 0) js += c * std::log(c / mid);
    const double d = std::sqrt(r) - std::sqrt(c);
    hel += d * d;
    tvd += std::fabs(r - c);
  }
  const double jsd = 0.5 * js / std::log(2.0);
  return {psi, kl, std::sqrt(std::max(jsd, 0.0)), std::sqrt(0.5 * hel), 0.5 * tvd};
}

ChiSquareResult ChiSquareHomogeneity(const uint64_t* ref, const uint64_t* cur, size_t k) {
  uint64_t n = 0, m = 0;
  for (size_t i = 0; i < k; ++i) {
    n += ref[i];
    m += cur[i];
  }
  if (n == 0 || m == 0) return {kNaN, kNaN, 0};
  const double dn = static_cast<double>(n), dm = static_cast<double>(m);
  const double total = dn + dm;
  double stat = 0;
  int64_t cols = 0;
  for (size_t i = 0; i < k; ++i) {
    const uint64_t col = ref[i] + cur[i];
    if (col == 0) continue;
    ++cols;
    const double dc = static_cast<double>(col);
    const double er = dn * dc / total;
    const double ec = dm * dc / total;
    const double a = static_cast<double>(ref[i]) - er;
    const double b = static_cast<double>(cur[i]) - ec;
    stat += a * a / er + b * b / ec;
  }
  const int64_t dof = cols - 1;
  if (dof <= 0) return {0.0, 1.0, 0};
  return {stat, ChiSquareSf(stat, static_cast<double>(dof)), dof};
}

// P(a, x) and Q(a, x) from the series x^a e^-x / Gamma(a+1) * sum x^k / (a+1)...(a+k)
// and the Legendre continued fraction for Q (evaluated with the modified Lentz
// method), each used where it converges fast: series for x < a + 1.
namespace {

constexpr double kGammaEps = 1e-16;
constexpr double kTiny = 1e-300;

double LogPrefactor(double a, double x) { return a * std::log(x) - x - std::lgamma(a); }

double GammaPSeries(double a, double x) {
  double term = 1.0 / a;
  double sum = term;
  const int max_iter = 100000 + static_cast<int>(10 * std::sqrt(a));
  for (int k = 1; k < max_iter; ++k) {
    term *= x / (a + k);
    sum += term;
    if (std::fabs(term) < std::fabs(sum) * kGammaEps) break;
  }
  return sum * std::exp(LogPrefactor(a, x));
}

double GammaQFraction(double a, double x) {
  double b = x + 1.0 - a;
  double c = 1.0 / kTiny;
  double d = 1.0 / b;
  double h = d;
  const int max_iter = 100000 + static_cast<int>(10 * std::sqrt(a));
  for (int i = 1; i < max_iter; ++i) {
    const double an = -i * (i - a);
    b += 2.0;
    d = an * d + b;
    if (std::fabs(d) < kTiny) d = kTiny;
    c = b + an / c;
    if (std::fabs(c) < kTiny) c = kTiny;
    d = 1.0 / d;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1.0) < kGammaEps) break;
  }
  return std::exp(LogPrefactor(a, x)) * h;
}

}  // namespace

double GammaP(double a, double x) {
  if (!(a > 0) || !(x >= 0) || std::isinf(a)) return kNaN;
  if (x == 0) return 0.0;
  if (std::isinf(x)) return 1.0;
  if (x < a + 1.0) return std::min(1.0, GammaPSeries(a, x));
  return std::max(0.0, 1.0 - GammaQFraction(a, x));
}

double GammaQ(double a, double x) {
  if (!(a > 0) || !(x >= 0) || std::isinf(a)) return kNaN;
  if (x == 0) return 1.0;
  if (std::isinf(x)) return 0.0;
  if (x < a + 1.0) return std::max(0.0, 1.0 - GammaPSeries(a, x));
  return std::min(1.0, GammaQFraction(a, x));
}

double ChiSquareSf(double stat, double dof) {
  if (std::isnan(stat) || !(dof > 0)) return kNaN;
  if (stat <= 0) return 1.0;
  return GammaQ(0.5 * dof, 0.5 * stat);
}

double KolmogorovSf(double lambda) {
  if (std::isnan(lambda)) return kNaN;
  if (lambda <= 0) return 1.0;
  constexpr double kPi = 3.14159265358979323846;
  if (lambda < 1.0) {
    // P(K <= l) = sqrt(2 pi)/l * sum_k exp(-(2k-1)^2 pi^2 / (8 l^2)).
    const double t = -kPi * kPi / (8.0 * lambda * lambda);
    double sum = 0;
    for (int k = 1; k < 100; ++k) {
      const double odd = 2.0 * k - 1.0;
      const double term = std::exp(odd * odd * t);
      sum += term;
      if (term < 1e-17 * sum) break;
    }
    return std::min(1.0, std::max(0.0, 1.0 - std::sqrt(2.0 * kPi) / lambda * sum));
  }
  double sum = 0;
  double sign = 1;
  for (int k = 1; k < 100; ++k) {
    const double term = std::exp(-2.0 * k * k * lambda * lambda);
    sum += sign * term;
    sign = -sign;
    if (term < 1e-17 * std::fabs(sum)) break;
  }
  return std::min(1.0, std::max(0.0, 2.0 * sum));
}

double KsPValue(double d, uint64_t n, uint64_t m) {
  if (n == 0 || m == 0 || std::isnan(d)) return kNaN;
  const double dn = static_cast<double>(n), dm = static_cast<double>(m);
  const double en = dn * dm / (dn + dm);
  const double s = std::sqrt(en);
  return KolmogorovSf((s + 0.12 + 0.11 / s) * d);
}

std::vector<double> AdjustPValues(const std::vector<double>& p, Correction correction) {
  std::vector<double> out(p);
  std::vector<size_t> idx;
  for (size_t i = 0; i < p.size(); ++i) {
    if (!std::isnan(p[i])) idx.push_back(i);
  }
  const double k = static_cast<double>(idx.size());
  if (correction == Correction::kBonferroni) {
    for (size_t i : idx) out[i] = std::min(1.0, p[i] * k);
  } else if (correction == Correction::kBenjaminiHochberg) {
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return p[a] < p[b]; });
    double running = 1.0;
    for (size_t r = idx.size(); r-- > 0;) {
      const double v = p[idx[r]] * k / static_cast<double>(r + 1);
      running = std::min(running, v);
      out[idx[r]] = std::min(1.0, running);
    }
  }
  return out;
}

// ---- Streaming window ------------------------------------------------------------

namespace {

struct FineBin {
  uint64_t count;
  double sum;  // anchored: sum of (value - anchor of the bin)
};

struct FeatureAcc {
  std::vector<FineBin> bins;     // numeric: fine bins + junk (non-finite)
  std::vector<uint64_t> codes;   // categorical: reference codes, unseen, missing
  double sum_d = 0;              // numeric: sum of (x - reference mean)
  double sumsq_d = 0;
  double min = kInf;
  double max = -kInf;

  void Clear() {
    std::fill(bins.begin(), bins.end(), FineBin{0, 0.0});
    std::fill(codes.begin(), codes.end(), 0);
    sum_d = sumsq_d = 0;
    min = kInf;
    max = -kInf;
  }
  void Add(const FeatureAcc& o) {
    for (size_t i = 0; i < bins.size(); ++i) {
      bins[i].count += o.bins[i].count;
      bins[i].sum += o.bins[i].sum;
    }
    for (size_t i = 0; i < codes.size(); ++i) codes[i] += o.codes[i];
    sum_d += o.sum_d;
    sumsq_d += o.sumsq_d;
    min = std::min(min, o.min);
    max = std::max(max, o.max);
  }
};

// Pass 1 over one column of a block: finite check, the cell of each value, and
// the moments. Non-finite values get the junk cell and the value `lo` (so the
// cell arithmetic stays finite) and are left out of the moments.
template <typename T>
void NumericPass1Scalar(const T* src, size_t stride, size_t begin, size_t rows,
                        const NumericIndex& ix, double shift, uint32_t* cell, double* xs_out,
                        FeatureAcc* acc) {
  const double lo = ix.lo, inv = ix.inv_width, last = ix.last_cell;
  const uint32_t junk_cell = static_cast<uint32_t>(ix.cells.size() - 1);
  double s = 0, q = 0, mn = kInf, mx = -kInf;
  for (size_t r = begin; r < rows; ++r) {
    const double x = ToDouble(src[r * stride]);
    bool finite = true;
    if constexpr (std::is_floating_point_v<T>) finite = IsFinite(x);
    const double v = finite ? x : lo;
    const uint32_t c = static_cast<uint32_t>(CellOf(v, lo, inv, last));
    cell[r] = finite ? c : junk_cell;
    xs_out[r] = v;
    const double d = finite ? v - shift : 0.0;
    s += d;
    q += d * d;
    mn = finite && v < mn ? v : mn;
    mx = finite && v > mx ? v : mx;
  }
  acc->sum_d += s;
  acc->sumsq_d += q;
  acc->min = std::min(acc->min, mn);
  acc->max = std::max(acc->max, mx);
}

#if defined(__SSE2__)
#if defined(__GNUC__)
#define SLUICE_ALWAYS_INLINE __attribute__((always_inline))
#else
#define SLUICE_ALWAYS_INLINE
#endif
// Two rows per vector, four per iteration. The same arithmetic as CellOf (SSE2
// max/min return their second operand on NaN, which gives cell 0 exactly like
// the scalar clamp), so the cells agree bit for bit with the index build.
template <typename T>
__m128d LoadPair(const T* src, size_t stride, size_t r) {
  if constexpr (std::is_same_v<T, float>) {
    const __m128 a = _mm_load_ss(src + r * stride);
    const __m128 b = _mm_load_ss(src + (r + 1) * stride);
    return _mm_cvtps_pd(_mm_unpacklo_ps(a, b));
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm_loadh_pd(_mm_load_sd(src + r * stride), src + (r + 1) * stride);
  } else {
    return _mm_set_pd(ToDouble(src[(r + 1) * stride]), ToDouble(src[r * stride]));
  }
}

template <typename T>
void NumericPass1(const T* src, size_t stride, size_t rows, const NumericIndex& ix, double shift,
                  uint32_t* cell, double* xs_out, FeatureAcc* acc) {
  const __m128d lo = _mm_set1_pd(ix.lo), inv = _mm_set1_pd(ix.inv_width);
  const __m128d last = _mm_set1_pd(ix.last_cell), sh = _mm_set1_pd(shift);
  const __m128d absmask = _mm_castsi128_pd(_mm_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
  const __m128d big = _mm_set1_pd(kDoubleMax);
  const __m128i junk = _mm_set1_epi32(static_cast<int>(ix.cells.size() - 1));
  __m128d s = _mm_setzero_pd(), q = _mm_setzero_pd();
  __m128d mn = _mm_set1_pd(kInf), mx = _mm_set1_pd(-kInf);
  auto two = [&](size_t r, __m128d* d_out, __m128d* xm_out) SLUICE_ALWAYS_INLINE {
    const __m128d x = LoadPair(src, stride, r);
    __m128d finite = _mm_castsi128_pd(_mm_cmpeq_epi32(_mm_setzero_si128(), _mm_setzero_si128()));
    if constexpr (std::is_floating_point_v<T>) finite = _mm_cmple_pd(_mm_and_pd(x, absmask), big);
    const __m128d v = _mm_or_pd(_mm_and_pd(finite, x), _mm_andnot_pd(finite, lo));
    __m128d u = _mm_mul_pd(_mm_sub_pd(v, lo), inv);
    u = _mm_max_pd(u, _mm_setzero_pd());
    u = _mm_min_pd(u, last);
    const __m128i c = _mm_cvttpd_epi32(u);  // non-finite: v == lo -> cell 0
    const __m128i bad = _mm_shuffle_epi32(_mm_castpd_si128(finite), _MM_SHUFFLE(3, 3, 2, 0));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(cell + r),
                     _mm_add_epi32(c, _mm_andnot_si128(bad, junk)));
    _mm_storeu_pd(xs_out + r, v);
    *d_out = _mm_and_pd(_mm_sub_pd(v, sh), finite);
    // Non-finite -> NaN, which min/max ignore when NaN is their first operand.
    *xm_out = _mm_or_pd(x, _mm_andnot_pd(finite, _mm_castsi128_pd(
                                                     _mm_cmpeq_epi32(_mm_setzero_si128(),
                                                                     _mm_setzero_si128()))));
  };
  size_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    __m128d d0, d1, x0, x1;
    two(r, &d0, &x0);
    two(r + 2, &d1, &x1);
    s = _mm_add_pd(s, _mm_add_pd(d0, d1));
    q = _mm_add_pd(q, _mm_add_pd(_mm_mul_pd(d0, d0), _mm_mul_pd(d1, d1)));
    mn = _mm_min_pd(x0, _mm_min_pd(x1, mn));
    mx = _mm_max_pd(x0, _mm_max_pd(x1, mx));
  }
  double sv[2], qv[2], mnv[2], mxv[2];
  _mm_storeu_pd(sv, s);
  _mm_storeu_pd(qv, q);
  _mm_storeu_pd(mnv, mn);
  _mm_storeu_pd(mxv, mx);
  acc->sum_d += sv[0] + sv[1];
  acc->sumsq_d += qv[0] + qv[1];
  acc->min = std::min({acc->min, mnv[0], mnv[1]});
  acc->max = std::max({acc->max, mxv[0], mxv[1]});
  NumericPass1Scalar(src, stride, r, rows, ix, shift, cell, xs_out, acc);
}
#else
template <typename T>
void NumericPass1(const T* src, size_t stride, size_t rows, const NumericIndex& ix, double shift,
                  uint32_t* cell, double* xs_out, FeatureAcc* acc) {
  NumericPass1Scalar(src, stride, 0, rows, ix, shift, cell, xs_out, acc);
}
#endif

// Pass 2: from the cell's first fine bin, `kSteps` branch-free steps of a
// binary search finish the bin (the index guarantees a cell holds fewer than
// 2^steps edges); then the bin's count and anchored sum. kSteps < 0: runtime.
template <int kSteps>
void NumericPass2(size_t rows, const NumericIndex& ix, int32_t steps_rt, const uint32_t* cell,
                  const double* xs, FineBin* bins) {
  const double* e = ix.edges.data();
  const double* anchors = ix.anchors.data();
  const uint16_t* cells = ix.cells.data();
  const int32_t steps = kSteps >= 0 ? kSteps : steps_rt;
  for (size_t r = 0; r < rows; ++r) {
    const double v = xs[r];
    size_t b = cells[cell[r]];
    for (int32_t k = steps - 1; k >= 0; --k) {
      const size_t half = size_t{1} << k;
      b += static_cast<size_t>(e[b + half - 1] <= v) << k;
    }
    bins[b].count += 1;
    bins[b].sum += v - anchors[b];
  }
}

template <typename T>
void UpdateNumeric(const T* src, size_t stride, size_t rows, const NumericIndex& ix, double shift,
                   uint32_t* cell, double* xs, FeatureAcc* acc) {
  NumericPass1(src, stride, rows, ix, shift, cell, xs, acc);
  FineBin* bins = acc->bins.data();
  switch (ix.steps) {
    case 0: NumericPass2<0>(rows, ix, 0, cell, xs, bins); break;
    case 1: NumericPass2<1>(rows, ix, 1, cell, xs, bins); break;
    case 2: NumericPass2<2>(rows, ix, 2, cell, xs, bins); break;
    case 3: NumericPass2<3>(rows, ix, 3, cell, xs, bins); break;
    default: NumericPass2<-1>(rows, ix, ix.steps, cell, xs, bins); break;
  }
}

template <typename T>
void UpdateCategorical(const T* src, size_t stride, size_t rows, const CategoricalProfile& p,
                       const CategoricalIndex& ix, FeatureAcc* acc) {
  uint64_t* counts = acc->codes.data();
  const size_t k = p.codes.size();
  const size_t unseen = k, missing = k + 1;
  for (size_t r = 0; r < rows; ++r) {
    const T v = src[r * stride];
    int64_t code;
    if constexpr (std::is_floating_point_v<T>) {
      const double x = static_cast<double>(v);
      if (std::isnan(x)) {
        ++counts[missing];
        continue;
      }
      if (!(x >= kInt64Lo && x < kInt64Hi) || std::trunc(x) != x) {
        ++counts[unseen];
        continue;
      }
      code = static_cast<int64_t>(x);
    } else if constexpr (std::is_same_v<T, uint64_t>) {
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        ++counts[unseen];
        continue;
      }
      code = static_cast<int64_t>(v);
    } else {
      code = static_cast<int64_t>(v);
    }
    size_t slot;
    if (!ix.dense.empty()) {
      const uint64_t off = static_cast<uint64_t>(code) - static_cast<uint64_t>(ix.base);
      slot = off < ix.dense.size() ? ix.dense[static_cast<size_t>(off)] : unseen;
    } else {
      const auto it = std::lower_bound(p.codes.begin(), p.codes.end(), code);
      slot = (it != p.codes.end() && *it == code) ? static_cast<size_t>(it - p.codes.begin())
                                                  : unseen;
    }
    ++counts[slot];
  }
}

double RateOrNaN(uint64_t bad, uint64_t good) {
  const uint64_t total = bad + good;
  return total == 0 ? kNaN : static_cast<double>(bad) / static_cast<double>(total);
}

void SetAllNaN(FeatureDrift* f) {
  f->mean = f->stddev = f->min = f->max = kNaN;
  f->psi = f->kl = f->js = f->hellinger = f->tvd = kNaN;
  f->ks_d = f->ks_d_bound = f->ks_p = kNaN;
  f->wasserstein = f->wasserstein_normed = f->wasserstein_bound = kNaN;
  f->chi2 = f->chi2_p = kNaN;
  f->out_of_range_share = f->unseen_share = kNaN;
  f->p_value = f->p_adjusted = kNaN;
}

void NumericStatistics(const NumericProfile& p, const NumericIndex& ix, const FeatureAcc& acc,
                       FeatureDrift* f) {
  const size_t fine = ix.fine_bins;
  const size_t count = p.sketch_edges.size();
  uint64_t m = 0;
  for (size_t j = 0; j < fine; ++j) m += acc.bins[j].count;
  f->m = m;
  f->nonfinite = acc.bins[fine].count;
  f->bins = static_cast<int32_t>(p.edges.size() + 1);
  if (m > 0) {
    const double dm = static_cast<double>(m);
    const double shift = p.n > 0 ? p.mean : 0.0;
    f->mean = shift + acc.sum_d / dm;
    const double var = (acc.sumsq_d - acc.sum_d * acc.sum_d / dm) / dm;
    f->stddev = std::sqrt(std::max(var, 0.0));
    f->min = acc.min;
    f->max = acc.max;
  }
  if (m == 0 || p.n == 0) return;

  // Coarse bins from the fine ones.
  std::vector<uint64_t> coarse(p.counts.size(), 0);
  for (size_t j = 0; j < fine; ++j) coarse[ix.fine_to_coarse[j]] += acc.bins[j].count;
  const BinnedDistances bd = CompareCounts(p.counts.data(), coarse.data(), coarse.size());
  f->psi = bd.psi;
  f->kl = bd.kl;
  f->js = bd.js;
  f->hellinger = bd.hellinger;
  f->tvd = bd.tvd;

  const double dn = static_cast<double>(p.n), dm = static_cast<double>(m);
  f->out_of_range_share = static_cast<double>(acc.bins[0].count + acc.bins[count].count) / dm;

  // KS and W1 over the fine grid (see the header for the bounds).
  const std::vector<double>& e = p.sketch_edges;
  double w1 = -acc.bins[0].sum / dm + acc.bins[count].sum / dm;  // exact tails
  double w1_bound = 0;
  uint64_t cum_r = 0, cum_c = acc.bins[0].count;
  double ks = static_cast<double>(cum_c) / dm;  // at e[0]-: F_R = 0
  double ks_bound = 0;
  for (size_t j = 1; j < count; ++j) {
    const double a = e[j - 1], b = e[j], w = b - a;
    const uint64_t rj = p.sketch_counts[j], cj = acc.bins[j].count;
    const double ar = static_cast<double>(cum_r) / dn, ac = static_cast<double>(cum_c) / dm;
    const double r = static_cast<double>(rj) / dn, c = static_cast<double>(cj) / dm;
    const double da = ar - ac;
    const double integral = da * w + (static_cast<double>(rj) * w - p.sketch_sums[j]) / dn -
                            (static_cast<double>(cj) * w - acc.bins[j].sum) / dm;
    const double lo = da - c, hi = da + r;
    if (lo >= 0 || hi <= 0) {
      w1 += std::fabs(integral);
    } else {
      // The sign may change inside: the exact value lies in [|I|, upper].
      const double lower = std::fabs(integral);
      const double mu = integral / w;
      const double t = std::min(1.0, std::max(0.0, (mu - lo) / (hi - lo)));
      const double upper = w * (t * hi - (1.0 - t) * lo);
      double est = lower;
      const double db = da + r - c;
      if (da * db < 0) {
        // One crossing of a linear difference: w (da^2 + db^2) / (2 (|da| + |db|)).
        est = w * (da * da + db * db) / (2.0 * (std::fabs(da) + std::fabs(db)));
        est = std::min(std::max(est, lower), upper);
      }
      w1 += est;
      w1_bound += std::max(upper - lower, 0.0);
    }
    cum_r += rj;
    cum_c += cj;
    ks = std::max(ks, std::fabs(static_cast<double>(cum_r) / dn - static_cast<double>(cum_c) / dm));
    if (b != std::nextafter(a, kInf)) ks_bound = std::max(ks_bound, std::min(r, c));
  }
  f->ks_d = ks;
  f->ks_d_bound = ks_bound;
  f->ks_p = KsPValue(ks, p.n, m);
  f->wasserstein = w1;
  f->wasserstein_bound = w1_bound;
  const double scale = std::max(p.stddev(), 0.001);
  f->wasserstein_normed = w1 / scale;
  f->p_value = f->ks_p;
}

void CategoricalStatistics(const CategoricalProfile& p, const FeatureAcc& acc, FeatureDrift* f) {
  const size_t k = p.codes.size();
  uint64_t m = 0;
  for (size_t i = 0; i <= k; ++i) m += acc.codes[i];
  f->m = m;
  f->nonfinite = acc.codes[k + 1];
  f->bins = static_cast<int32_t>(k);
  if (m == 0 || p.n == 0) return;
  std::vector<uint64_t> ref(p.counts);
  ref.push_back(0);  // the unseen bucket
  const BinnedDistances bd = CompareCounts(ref.data(), acc.codes.data(), k + 1);
  f->psi = bd.psi;
  f->kl = bd.kl;
  f->js = bd.js;
  f->hellinger = bd.hellinger;
  f->tvd = bd.tvd;
  const ChiSquareResult chi = ChiSquareHomogeneity(ref.data(), acc.codes.data(), k + 1);
  f->chi2 = chi.stat;
  f->chi2_p = chi.p;
  f->chi2_dof = chi.dof;
  f->unseen_share = static_cast<double>(acc.codes[k]) / static_cast<double>(m);
  f->p_value = chi.p;
}

}  // namespace

struct StreamingWindow::Pane {
  uint64_t rows = 0;
  int64_t start_ns = 0;
  std::vector<FeatureAcc> features;

  void Clear() {
    rows = 0;
    start_ns = 0;
    for (FeatureAcc& f : features) f.Clear();
  }
  void Add(const Pane& o) {
    rows += o.rows;
    for (size_t i = 0; i < features.size(); ++i) features[i].Add(o.features[i]);
  }
};

StreamingWindow::StreamingWindow(std::shared_ptr<const DriftProfile> profile,
                                 const WindowOptions& options)
    : profile_(std::move(profile)), options_(options) {}

StreamingWindow::~StreamingWindow() = default;

Status StreamingWindow::Create(std::shared_ptr<const DriftProfile> profile,
                               const WindowOptions& options,
                               std::unique_ptr<StreamingWindow>* out) {
  if (!profile || profile->num_features() == 0) {
    return Status::InvalidArgument("window needs a non-empty profile");
  }
  if (options.panes < 1 || options.panes > 1u << 16) {
    return Status::InvalidArgument("panes must be in [1, 65536], got " +
                                   std::to_string(options.panes));
  }
  if (options.pane_ns < 0) return Status::InvalidArgument("pane_ns must be >= 0");
  std::unique_ptr<StreamingWindow> w(new StreamingWindow(std::move(profile), options));
  const DriftProfile& p = *w->profile_;
  Pane proto;
  proto.features.resize(p.num_features());
  for (size_t i = 0; i < p.num_features(); ++i) {
    if (p.feature(i).kind == FeatureKind::kNumeric) {
      proto.features[i].bins.assign(p.numeric_index(i).fine_bins + 1, FineBin{0, 0.0});
    } else {
      proto.features[i].codes.assign(p.feature(i).categorical.codes.size() + 2, 0);
    }
  }
  for (uint32_t i = 0; i < options.panes; ++i) w->ring_.push_back(std::make_unique<Pane>(proto));
  *out = std::move(w);
  return Status::Ok();
}

StreamingWindow::Pane& StreamingWindow::Slot(size_t age) {
  return *ring_[(newest_ + ring_.size() - age) % ring_.size()];
}

const StreamingWindow::Pane& StreamingWindow::Slot(size_t age) const {
  return *ring_[(newest_ + ring_.size() - age) % ring_.size()];
}

void StreamingWindow::Rotate(int64_t new_start_ns) {
  newest_ = (newest_ + 1) % ring_.size();
  ring_[newest_]->Clear();
  ring_[newest_]->start_ns = new_start_ns;
  open_start_ns_ = new_start_ns;
}

void StreamingWindow::Advance(int64_t now_ns) {
  latest_ns_ = started_ ? std::max(latest_ns_, now_ns) : now_ns;
  const int64_t now = latest_ns_;
  const int64_t t = options_.pane_ns;
  if (!started_) {
    started_ = true;
    // Time-only panes are aligned to multiples of pane_ns (so windows merge by time).
    open_start_ns_ = (t > 0 && options_.pane_rows == 0) ? now - ((now % t) + t) % t : now;
    Slot(0).start_ns = open_start_ns_;
    return;
  }
  if (t <= 0 || now - open_start_ns_ < t) return;
  const int64_t elapsed = (now - open_start_ns_) / t;
  const int64_t rotations = std::min<int64_t>(elapsed, static_cast<int64_t>(ring_.size()));
  const int64_t final_start = open_start_ns_ + elapsed * t;
  for (int64_t i = rotations; i > 0; --i) Rotate(final_start - (i - 1) * t);
  open_start_ns_ = final_start;
}

Status StreamingWindow::Update(const MatrixView& batch, int64_t now_ns) {
  Status st = CheckMatrix(batch, "batch");
  if (!st.ok()) return st;
  const DriftProfile& p = *profile_;
  if (batch.cols != p.num_features()) {
    return Status::InvalidArgument("batch has " + std::to_string(batch.cols) +
                                   " columns, the profile " + std::to_string(p.num_features()));
  }
  Advance(now_ns);
  scratch_cell_.resize(kBlockRows);
  scratch_x_.resize(kBlockRows);
  uint32_t* cell = scratch_cell_.data();
  double* xs = scratch_x_.data();
  size_t done = 0;
  while (done < batch.rows) {
    size_t take = batch.rows - done;
    if (options_.pane_rows > 0) {
      // A full pane closes when the next row arrives (so the window holds the
      // last panes * pane_rows rows); a merge may also have overfilled it.
      if (Slot(0).rows >= options_.pane_rows) Rotate(latest_ns_);
      const uint64_t room = options_.pane_rows - Slot(0).rows;
      take = static_cast<size_t>(std::min<uint64_t>(take, room));
    }
    Pane& pane = Slot(0);
    st = DispatchDType(batch.dtype, batch.data, [&](const auto* base) {
      for (size_t r0 = done; r0 < done + take; r0 += kBlockRows) {
        const size_t rows = std::min(kBlockRows, done + take - r0);
        for (size_t c = 0; c < batch.cols; ++c) {
          const auto* col = base + r0 * batch.cols + c;
          if (p.feature(c).kind == FeatureKind::kNumeric) {
            const NumericProfile& np = p.feature(c).numeric;
            UpdateNumeric(col, batch.cols, rows, p.numeric_index(c), np.n > 0 ? np.mean : 0.0,
                          cell, xs, &pane.features[c]);
          } else {
            UpdateCategorical(col, batch.cols, rows, p.feature(c).categorical,
                              p.categorical_index(c), &pane.features[c]);
          }
        }
      }
    });
    if (!st.ok()) return st;
    pane.rows += take;
    done += take;
  }
  return Status::Ok();
}

Status StreamingWindow::Merge(const StreamingWindow& other) {
  if (&other == this) return Status::InvalidArgument("cannot merge a window into itself");
  if (other.options_.pane_rows != options_.pane_rows || other.options_.pane_ns != options_.pane_ns ||
      other.options_.panes != options_.panes) {
    return Status::InvalidArgument("windows have different pane options");
  }
  if (other.profile_ != profile_ && other.profile_->Serialize() != profile_->Serialize()) {
    return Status::InvalidArgument("windows have different profiles");
  }
  if (!other.started_) return Status::Ok();
  size_t offset = 0;
  const bool aligned = options_.pane_ns > 0 && options_.pane_rows == 0;
  if (aligned) {
    Advance(other.latest_ns_);
    const int64_t lag = (open_start_ns_ - other.open_start_ns_) / options_.pane_ns;
    if (lag >= static_cast<int64_t>(ring_.size())) return Status::Ok();
    offset = static_cast<size_t>(std::max<int64_t>(lag, 0));
  } else if (!started_) {
    Advance(other.latest_ns_);
  } else {
    latest_ns_ = std::max(latest_ns_, other.latest_ns_);
  }
  for (size_t age = 0; age + offset < ring_.size(); ++age) {
    Slot(age + offset).Add(other.Slot(age));
  }
  return Status::Ok();
}

void StreamingWindow::Reset() {
  for (auto& pane : ring_) pane->Clear();
  newest_ = 0;
  started_ = false;
  open_start_ns_ = 0;
  latest_ns_ = 0;
}

FeatureCounts StreamingWindow::Counts(size_t feature) const {
  FeatureCounts out;
  if (feature >= profile_->num_features()) return out;
  const FeatureProfile& fp = profile_->feature(feature);
  if (fp.kind == FeatureKind::kNumeric) {
    const NumericIndex& ix = profile_->numeric_index(feature);
    out.fine.assign(ix.fine_bins, 0);
    out.fine_sums.assign(ix.fine_bins, 0.0);
    out.coarse.assign(fp.numeric.counts.size(), 0);
    for (size_t age = 0; age < ring_.size(); ++age) {
      const FeatureAcc& acc = Slot(age).features[feature];
      for (size_t j = 0; j < ix.fine_bins; ++j) {
        out.fine[j] += acc.bins[j].count;
        out.fine_sums[j] += acc.bins[j].sum;
        out.coarse[ix.fine_to_coarse[j]] += acc.bins[j].count;
      }
      out.nonfinite += acc.bins[ix.fine_bins].count;
    }
  } else {
    const size_t k = fp.categorical.codes.size();
    out.coarse.assign(k + 1, 0);
    for (size_t age = 0; age < ring_.size(); ++age) {
      const FeatureAcc& acc = Slot(age).features[feature];
      for (size_t j = 0; j <= k; ++j) out.coarse[j] += acc.codes[j];
      out.nonfinite += acc.codes[k + 1];
    }
  }
  return out;
}

uint64_t StreamingWindow::rows() const {
  uint64_t total = 0;
  for (const auto& pane : ring_) total += pane->rows;
  return total;
}

DriftReport StreamingWindow::Statistics(const VerdictOptions& verdict) const {
  const DriftProfile& p = *profile_;
  DriftReport report;
  report.latest_ns = latest_ns_;
  Pane total = *ring_[0];
  total.Clear();
  for (size_t age = 0; age < ring_.size(); ++age) {
    const Pane& pane = Slot(age);
    total.Add(pane);
    if (pane.rows > 0) report.oldest_pane_ns = pane.start_ns;
  }
  report.rows = total.rows;
  report.features.resize(p.num_features());
  std::vector<double> pvals(p.num_features(), kNaN);
  for (size_t i = 0; i < p.num_features(); ++i) {
    FeatureDrift& f = report.features[i];
    SetAllNaN(&f);
    const FeatureProfile& fp = p.feature(i);
    f.kind = fp.kind;
    if (fp.kind == FeatureKind::kNumeric) {
      f.n = fp.numeric.n;
      f.nonfinite_rate_ref = RateOrNaN(fp.numeric.nonfinite, fp.numeric.n);
      NumericStatistics(fp.numeric, p.numeric_index(i), total.features[i], &f);
    } else {
      f.n = fp.categorical.n;
      f.nonfinite_rate_ref = RateOrNaN(fp.categorical.missing, fp.categorical.n);
      CategoricalStatistics(fp.categorical, total.features[i], &f);
    }
    f.nonfinite_rate = RateOrNaN(f.nonfinite, f.m);
    f.nonfinite_rate_change = f.nonfinite_rate - f.nonfinite_rate_ref;
    pvals[i] = f.p_value;
  }
  const std::vector<double> adjusted = AdjustPValues(pvals, verdict.correction);
  const bool uses_psi = verdict.rule != DriftRule::kPValue;
  const bool uses_p = verdict.rule != DriftRule::kPsi;
  for (size_t i = 0; i < p.num_features(); ++i) {
    FeatureDrift& f = report.features[i];
    f.p_adjusted = adjusted[i];
    f.verdict = Verdict::kInsufficientData;
    if (f.m == 0 || f.n == 0) continue;
    if (uses_psi && (std::isnan(f.psi) || static_cast<double>(f.m) <
                                              verdict.min_rows_per_bin * std::max(f.bins, 1))) {
      continue;
    }
    if (uses_p && std::isnan(f.p_adjusted)) continue;
    const bool psi_drift = uses_psi && f.psi >= verdict.psi_threshold;
    const bool p_drift = uses_p && f.p_adjusted < verdict.alpha;
    bool drift = false;
    switch (verdict.rule) {
      case DriftRule::kPsi: drift = psi_drift; break;
      case DriftRule::kPValue: drift = p_drift; break;
      case DriftRule::kPsiAndPValue: drift = psi_drift && p_drift; break;
      case DriftRule::kPsiOrPValue: drift = psi_drift || p_drift; break;
    }
    f.verdict = drift ? Verdict::kDrift : Verdict::kNoDrift;
    ++report.evaluated;
    if (drift) ++report.drifted;
  }
  if (report.evaluated == 0) {
    report.drift_share = kNaN;
    report.dataset = Verdict::kInsufficientData;
  } else {
    report.drift_share =
        static_cast<double>(report.drifted) / static_cast<double>(report.evaluated);
    report.dataset =
        report.drift_share >= verdict.drift_share ? Verdict::kDrift : Verdict::kNoDrift;
  }
  return report;
}

}  // namespace sluice::drift
