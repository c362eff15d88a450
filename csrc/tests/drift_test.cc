#include "sluice/drift.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace sluice::drift {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::shared_ptr<const DriftProfile> ProfileOf(const std::vector<double>& column,
                                              ProfileOptions options = ProfileOptions()) {
  auto p = std::make_shared<DriftProfile>();
  const Status st = DriftProfile::Build({column.data(), DType::kFloat64, column.size(), 1}, {}, {},
                                        options, p.get());
  EXPECT_TRUE(st.ok()) << st.ToString();
  return p;
}

std::unique_ptr<StreamingWindow> WindowOf(std::shared_ptr<const DriftProfile> profile,
                                          WindowOptions options = WindowOptions()) {
  std::unique_ptr<StreamingWindow> w;
  const Status st = StreamingWindow::Create(std::move(profile), options, &w);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return w;
}

void Feed(StreamingWindow* w, const std::vector<double>& column, int64_t now_ns = 0) {
  const Status st = w->Update({column.data(), DType::kFloat64, column.size(), 1}, now_ns);
  ASSERT_TRUE(st.ok()) << st.ToString();
}

std::vector<double> Normal(size_t n, double mean, double sd, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(mean, sd);
  std::vector<double> out(n);
  for (double& v : out) v = dist(gen);
  return out;
}

// Bin index under the left-closed convention: number of edges <= x.
size_t BinOf(const std::vector<double>& edges, double x) {
  return static_cast<size_t>(std::upper_bound(edges.begin(), edges.end(), x) - edges.begin());
}

TEST(DriftQuantileTest, MatchesNumpyLinear) {
  const std::vector<double> x = {1, 2, 3, 4, 10};
  EXPECT_DOUBLE_EQ(QuantileSorted(x.data(), x.size(), 0.1), 1.4);
  EXPECT_DOUBLE_EQ(QuantileSorted(x.data(), x.size(), 0.25), 2.0);
  EXPECT_DOUBLE_EQ(QuantileSorted(x.data(), x.size(), 0.5), 3.0);
  EXPECT_EQ(QuantileSorted(x.data(), x.size(), 0.9), 7.6000000000000005);  // bit-exact
  EXPECT_EQ(QuantileSorted(x.data(), x.size(), 1.0), 10.0);
  EXPECT_EQ(QuantileSorted(x.data(), x.size(), 0.0), 1.0);
}

TEST(DriftProfileTest, DecileEdgesAndCounts) {
  std::vector<double> x(100);
  for (int i = 0; i < 100; ++i) x[static_cast<size_t>(i)] = i + 1;
  const auto p = ProfileOf(x);
  const NumericProfile& np = p->feature(0).numeric;
  const std::vector<double> expect = {10.9, 20.8, 30.7, 40.6, 50.5, 60.4, 70.3, 80.2,
                                      90.10000000000001};
  ASSERT_EQ(np.edges.size(), expect.size());
  for (size_t i = 0; i < expect.size(); ++i) EXPECT_EQ(np.edges[i], expect[i]) << i;
  ASSERT_EQ(np.counts.size(), 10u);
  for (uint64_t c : np.counts) EXPECT_EQ(c, 10u);
  EXPECT_EQ(np.n, 100u);
  EXPECT_DOUBLE_EQ(np.mean, 50.5);
  EXPECT_DOUBLE_EQ(np.variance(), 833.25);
  EXPECT_EQ(np.min, 1.0);
  EXPECT_EQ(np.max, 100.0);
  // Every coarse edge is a fine edge; the grid starts at min and ends past max.
  for (double e : np.edges) {
    EXPECT_TRUE(std::binary_search(np.sketch_edges.begin(), np.sketch_edges.end(), e)) << e;
  }
  EXPECT_EQ(np.sketch_edges.front(), 1.0);
  EXPECT_EQ(np.sketch_edges.back(), std::nextafter(100.0, kInf));
  uint64_t total = 0;
  for (uint64_t c : np.sketch_counts) total += c;
  EXPECT_EQ(total, 100u);
}

TEST(DriftProfileTest, ValuesOnEdgesGoToTheUpperBin) {
  const auto p = ProfileOf({1, 1, 2, 2, 3, 3, 4, 4});
  const NumericProfile& np = p->feature(0).numeric;
  auto w = WindowOf(p);
  std::vector<double> cur = {1, 2, 3, 4, 0, 5, 2.5};
  Feed(w.get(), cur);
  const FeatureCounts c = w->Counts(0);
  std::vector<uint64_t> expect(np.edges.size() + 1, 0);
  for (double v : cur) ++expect[BinOf(np.edges, v)];
  EXPECT_EQ(c.coarse, expect);
}

TEST(DriftProfileTest, ConstantReferenceHasTwoBins) {
  const auto p = ProfileOf(std::vector<double>(50, 7.0));
  const NumericProfile& np = p->feature(0).numeric;
  ASSERT_EQ(np.edges.size(), 1u);
  EXPECT_EQ(np.edges[0], 7.0);
  EXPECT_EQ(np.counts, (std::vector<uint64_t>{0, 50}));
  EXPECT_EQ(np.variance(), 0.0);
  auto same = WindowOf(p);
  Feed(same.get(), std::vector<double>(40, 7.0));
  const FeatureDrift f = same->Statistics().features[0];
  EXPECT_EQ(f.psi, 0.0);
  EXPECT_EQ(f.ks_d, 0.0);
  EXPECT_EQ(f.wasserstein, 0.0);
  EXPECT_EQ(f.out_of_range_share, 0.0);
  auto moved = WindowOf(p);
  Feed(moved.get(), std::vector<double>(40, 8.0));
  const FeatureDrift g = moved->Statistics().features[0];
  EXPECT_TRUE(std::isfinite(g.psi));
  EXPECT_EQ(g.ks_d, 1.0);
  EXPECT_NEAR(g.wasserstein, 1.0, 1e-12);
  EXPECT_NEAR(g.wasserstein_normed, 1000.0, 1e-9);  // std floor 0.001
  EXPECT_EQ(g.out_of_range_share, 1.0);
}

TEST(DriftWindowTest, FineAndCoarseCountsMatchBruteForceForEveryDType) {
  const auto ref = Normal(5000, 0, 10, 1);
  const auto p = ProfileOf(ref);
  const NumericProfile& np = p->feature(0).numeric;
  std::mt19937_64 gen(2);
  std::uniform_real_distribution<double> u(-60, 60);
  std::vector<double> values(3000);
  for (double& v : values) v = std::round(u(gen));
  // Exactly the edge values too.
  values.insert(values.end(), np.sketch_edges.begin(), np.sketch_edges.end() - 1);
  auto check = [&](auto tag, DType dtype) {
    using T = decltype(tag);
    std::vector<T> typed;
    std::vector<double> as_double;
    for (double v : values) {
      if (std::is_unsigned_v<T> && v < 0) continue;
      if (sizeof(T) == 1 && std::fabs(v) > 100) continue;
      typed.push_back(static_cast<T>(v));
      as_double.push_back(static_cast<double>(typed.back()));
    }
    auto w = WindowOf(p);
    ASSERT_TRUE(w->Update({typed.data(), dtype, typed.size(), 1}, 0).ok());
    const FeatureCounts c = w->Counts(0);
    std::vector<uint64_t> fine(np.sketch_edges.size() + 1, 0), coarse(np.edges.size() + 1, 0);
    for (double v : as_double) {
      ++fine[BinOf(np.sketch_edges, v)];
      ++coarse[BinOf(np.edges, v)];
    }
    EXPECT_EQ(c.fine, fine) << DTypeName(dtype);
    EXPECT_EQ(c.coarse, coarse) << DTypeName(dtype);
  };
  check(double{}, DType::kFloat64);
  check(float{}, DType::kFloat32);
  check(int32_t{}, DType::kInt32);
  check(int64_t{}, DType::kInt64);
  check(int16_t{}, DType::kInt16);
  check(int8_t{}, DType::kInt8);
  check(uint8_t{}, DType::kUInt8);
  check(uint16_t{}, DType::kUInt16);
  check(uint32_t{}, DType::kUInt32);
  check(uint64_t{}, DType::kUInt64);
}

TEST(DriftWindowTest, Float32UsesExactComparisonsAgainstDoubleEdges) {
  // Edges that are not representable in float32: the comparison must still be
  // float -> double -> compare, never a rounded edge.
  std::vector<double> ref;
  for (int i = 0; i < 1000; ++i) ref.push_back(0.1 * i + 1e-9);
  const auto p = ProfileOf(ref);
  const NumericProfile& np = p->feature(0).numeric;
  std::vector<float> cur;
  const float inf_f = std::numeric_limits<float>::infinity();
  for (double e : np.sketch_edges) {
    const float f = static_cast<float>(e);
    cur.push_back(f);
    cur.push_back(std::nextafter(f, -inf_f));
    cur.push_back(std::nextafter(f, inf_f));
  }
  auto w = WindowOf(p);
  ASSERT_TRUE(w->Update({cur.data(), DType::kFloat32, cur.size(), 1}, 0).ok());
  std::vector<uint64_t> fine(np.sketch_edges.size() + 1, 0);
  for (float v : cur) ++fine[BinOf(np.sketch_edges, static_cast<double>(v))];
  EXPECT_EQ(w->Counts(0).fine, fine);
}

TEST(DriftWindowTest, HeavyTailsAndManyFeaturesCountExactly) {
  std::mt19937_64 gen(3);
  std::cauchy_distribution<double> cauchy;
  const size_t rows = 4000, cols = 3;
  std::vector<double> ref(rows * cols);
  for (size_t i = 0; i < rows; ++i) {
    ref[i * cols] = cauchy(gen);
    ref[i * cols + 1] = std::floor(cauchy(gen));  // discrete, many ties
    ref[i * cols + 2] = static_cast<double>(i % 3);
  }
  auto p = std::make_shared<DriftProfile>();
  ASSERT_TRUE(DriftProfile::Build({ref.data(), DType::kFloat64, rows, cols}, {}, {}, {}, p.get()).ok());
  std::vector<double> cur(rows * cols);
  for (double& v : cur) v = 3 * cauchy(gen);
  auto w = WindowOf(p);
  ASSERT_TRUE(w->Update({cur.data(), DType::kFloat64, rows, cols}, 0).ok());
  for (size_t c = 0; c < cols; ++c) {
    const NumericProfile& np = p->feature(c).numeric;
    std::vector<uint64_t> fine(np.sketch_edges.size() + 1, 0);
    for (size_t i = 0; i < rows; ++i) ++fine[BinOf(np.sketch_edges, cur[i * cols + c])];
    EXPECT_EQ(w->Counts(c).fine, fine) << "column " << c;
  }
}

TEST(DriftWindowTest, NonFiniteValuesAreCountedNotBinned) {
  std::vector<double> ref = Normal(1000, 0, 1, 4);
  ref.push_back(kNaN);
  ref.push_back(kInf);
  const auto p = ProfileOf(ref);
  EXPECT_EQ(p->feature(0).numeric.n, 1000u);
  EXPECT_EQ(p->feature(0).numeric.nonfinite, 2u);
  auto w = WindowOf(p);
  std::vector<double> cur = Normal(200, 0, 1, 5);
  const double lo = *std::min_element(cur.begin(), cur.end());
  const double hi = *std::max_element(cur.begin(), cur.end());
  cur.insert(cur.end(), {kNaN, kInf, -kInf, kNaN});
  Feed(w.get(), cur);
  const FeatureDrift f = w->Statistics().features[0];
  EXPECT_EQ(f.m, 200u);
  EXPECT_EQ(f.nonfinite, 4u);
  EXPECT_DOUBLE_EQ(f.nonfinite_rate, 4.0 / 204.0);
  EXPECT_DOUBLE_EQ(f.nonfinite_rate_ref, 2.0 / 1002.0);
  EXPECT_DOUBLE_EQ(f.nonfinite_rate_change, 4.0 / 204.0 - 2.0 / 1002.0);
  EXPECT_EQ(f.min, lo);
  EXPECT_EQ(f.max, hi);
  EXPECT_TRUE(std::isfinite(f.mean));
  EXPECT_TRUE(std::isfinite(f.psi));
  EXPECT_TRUE(std::isfinite(f.wasserstein));
}

TEST(DriftWindowTest, EmptyWindowGivesNaNAndNoVerdict) {
  auto w = WindowOf(ProfileOf(Normal(1000, 0, 1, 6)));
  const DriftReport r = w->Statistics();
  const FeatureDrift& f = r.features[0];
  EXPECT_EQ(f.m, 0u);
  for (double v : {f.psi, f.kl, f.js, f.hellinger, f.tvd, f.ks_d, f.ks_p, f.wasserstein,
                   f.wasserstein_normed, f.out_of_range_share, f.mean, f.stddev, f.min, f.max,
                   f.p_value, f.nonfinite_rate}) {
    EXPECT_TRUE(std::isnan(v));
  }
  EXPECT_EQ(f.verdict, Verdict::kInsufficientData);
  EXPECT_EQ(r.dataset, Verdict::kInsufficientData);
  EXPECT_TRUE(std::isnan(r.drift_share));
  // Only non-finite values: still empty.
  Feed(w.get(), {kNaN, kInf});
  const FeatureDrift g = w->Statistics().features[0];
  EXPECT_TRUE(std::isnan(g.psi));
  EXPECT_EQ(g.nonfinite, 2u);
  EXPECT_DOUBLE_EQ(g.nonfinite_rate, 1.0);
}

TEST(DriftWindowTest, AllNaNReferenceColumnGivesNaN) {
  const auto p = ProfileOf({kNaN, kNaN, kNaN});
  const NumericProfile& np = p->feature(0).numeric;
  EXPECT_EQ(np.n, 0u);
  EXPECT_EQ(np.nonfinite, 3u);
  EXPECT_TRUE(np.edges.empty());
  auto w = WindowOf(p);
  Feed(w.get(), {1.0, 2.0, kNaN});
  const FeatureDrift f = w->Statistics().features[0];
  EXPECT_EQ(f.m, 2u);
  EXPECT_EQ(f.nonfinite, 1u);
  EXPECT_TRUE(std::isnan(f.psi));
  EXPECT_TRUE(std::isnan(f.ks_d));
  EXPECT_DOUBLE_EQ(f.mean, 1.5);
  EXPECT_EQ(f.verdict, Verdict::kInsufficientData);
  const std::string bytes = p->Serialize();
  DriftProfile q;
  EXPECT_TRUE(DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(bytes.data()),
                                        bytes.size(), &q)
                  .ok());
}

TEST(DriftWindowTest, TooFewRowsForABinnedVerdict) {
  auto w = WindowOf(ProfileOf(Normal(5000, 0, 1, 7)));
  Feed(w.get(), Normal(99, 3, 1, 8));  // < 10 rows per bin x 10 bins
  const FeatureDrift f = w->Statistics().features[0];
  EXPECT_GT(f.psi, 1.0);
  EXPECT_EQ(f.verdict, Verdict::kInsufficientData);
  Feed(w.get(), Normal(1, 3, 1, 9));
  EXPECT_EQ(w->Statistics().features[0].verdict, Verdict::kDrift);
  VerdictOptions pv;
  pv.rule = DriftRule::kPValue;  // no bins involved: tiny windows get a verdict
  auto tiny = WindowOf(ProfileOf(Normal(5000, 0, 1, 7)));
  Feed(tiny.get(), Normal(20, 3, 1, 10));
  EXPECT_EQ(tiny->Statistics(pv).features[0].verdict, Verdict::kDrift);
}

TEST(DriftWindowTest, MergeEqualsOneStream) {
  const auto p = ProfileOf(Normal(3000, 0, 1, 11));
  const auto a_data = Normal(700, 0.3, 1.2, 12);
  const auto b_data = Normal(500, -0.1, 0.9, 13);
  auto one = WindowOf(p), a = WindowOf(p), b = WindowOf(p);
  Feed(one.get(), a_data);
  Feed(one.get(), b_data);
  Feed(a.get(), a_data);
  Feed(b.get(), b_data);
  ASSERT_TRUE(a->Merge(*b).ok());
  const FeatureDrift x = one->Statistics().features[0];
  const FeatureDrift y = a->Statistics().features[0];
  EXPECT_EQ(one->Counts(0).fine, a->Counts(0).fine);
  EXPECT_EQ(x.m, y.m);
  EXPECT_EQ(x.psi, y.psi);
  EXPECT_EQ(x.ks_d, y.ks_d);
  EXPECT_EQ(x.min, y.min);
  EXPECT_EQ(x.max, y.max);
  EXPECT_NEAR(x.wasserstein, y.wasserstein, 1e-12);
  EXPECT_NEAR(x.mean, y.mean, 1e-12);
  EXPECT_NEAR(x.stddev, y.stddev, 1e-12);
}

TEST(DriftWindowTest, MergeAlignsTimePanes) {
  const auto p = ProfileOf(Normal(3000, 0, 1, 14));
  WindowOptions o;
  o.pane_ns = 100;
  o.panes = 3;
  auto one = WindowOf(p, o), a = WindowOf(p, o), b = WindowOf(p, o);
  for (int t = 0; t < 6; ++t) {
    const auto batch = Normal(50, t * 0.1, 1, 20 + static_cast<uint64_t>(t));
    Feed(one.get(), batch, t * 100 + 10);
    Feed(t % 2 ? a.get() : b.get(), batch, t * 100 + 10);
  }
  ASSERT_TRUE(a->Merge(*b).ok());
  EXPECT_EQ(one->rows(), 150u);
  EXPECT_EQ(a->rows(), 150u);
  EXPECT_EQ(one->Counts(0).fine, a->Counts(0).fine);
}

TEST(DriftWindowTest, PanesExpireByCount) {
  const auto p = ProfileOf(Normal(1000, 0, 1, 15));
  WindowOptions o;
  o.pane_rows = 100;
  o.panes = 3;
  auto w = WindowOf(p, o);
  Feed(w.get(), std::vector<double>(250, -100.0));  // panes 100 | 100 | 50 (open)
  EXPECT_EQ(w->rows(), 250u);
  Feed(w.get(), std::vector<double>(250, 100.0));  // 50+50 | 100 | 100: the last 300 rows
  EXPECT_EQ(w->rows(), 300u);
  EXPECT_EQ(w->Statistics().features[0].min, -100.0);
  Feed(w.get(), std::vector<double>(50, 100.0));  // 100 | 100 | 50
  EXPECT_EQ(w->rows(), 250u);
  const FeatureDrift f = w->Statistics().features[0];
  EXPECT_EQ(f.min, 100.0);  // every -100 row has expired
  EXPECT_EQ(f.m, 250u);
}

TEST(DriftWindowTest, PanesExpireByTime) {
  const auto p = ProfileOf(Normal(1000, 0, 1, 16));
  WindowOptions o;
  o.pane_ns = 1000;
  o.panes = 3;
  auto w = WindowOf(p, o);
  Feed(w.get(), {-5.0}, 10);     // pane [0, 1000)
  Feed(w.get(), {0.0}, 1500);    // pane [1000, 2000)
  Feed(w.get(), {5.0}, 2999);    // pane [2000, 3000)
  EXPECT_EQ(w->rows(), 3u);
  EXPECT_EQ(w->Statistics().oldest_pane_ns, 0);
  w->Advance(3000);  // the first pane leaves
  EXPECT_EQ(w->rows(), 2u);
  EXPECT_EQ(w->Statistics().features[0].min, 0.0);
  EXPECT_EQ(w->Statistics().oldest_pane_ns, 1000);
  Feed(w.get(), {1.0}, 2000);  // earlier than the latest time: taken as 3000
  EXPECT_EQ(w->rows(), 3u);
  w->Advance(1000000);  // long idle: everything expires
  EXPECT_EQ(w->rows(), 0u);
  EXPECT_TRUE(std::isnan(w->Statistics().features[0].psi));
}

TEST(DriftWindowTest, RowsAndTimeTogether) {
  const auto p = ProfileOf(Normal(1000, 0, 1, 17));
  WindowOptions o;
  o.pane_rows = 10;
  o.pane_ns = 1000;
  o.panes = 2;
  auto w = WindowOf(p, o);
  Feed(w.get(), std::vector<double>(25, 1.0), 0);  // 10 | 10 | 5 -> keeps the last two
  EXPECT_EQ(w->rows(), 15u);
  w->Advance(999);
  EXPECT_EQ(w->rows(), 15u);
  w->Advance(1000);  // the open pane (opened at 0) times out
  EXPECT_EQ(w->rows(), 5u);
}

TEST(DriftWindowTest, BatchShapeIsChecked) {
  auto w = WindowOf(ProfileOf(Normal(100, 0, 1, 18)));
  const std::vector<double> two_cols(10, 0.0);
  EXPECT_EQ(w->Update({two_cols.data(), DType::kFloat64, 5, 2}, 0).code(),
            StatusCode::kInvalidArgument);
}

TEST(DriftCategoricalTest, UnseenMissingAndChiSquare) {
  // Reference codes 3 (30), 7 (20), 9 (50); window 3 (25), 7 (25), 9 (40), 11 (10).
  std::vector<double> ref, cur;
  for (int i = 0; i < 30; ++i) ref.push_back(3);
  for (int i = 0; i < 20; ++i) ref.push_back(7);
  for (int i = 0; i < 50; ++i) ref.push_back(9);
  ref.push_back(kNaN);
  for (int i = 0; i < 25; ++i) cur.push_back(3);
  for (int i = 0; i < 25; ++i) cur.push_back(7);
  for (int i = 0; i < 40; ++i) cur.push_back(9);
  for (int i = 0; i < 10; ++i) cur.push_back(11);
  cur.push_back(kNaN);
  cur.push_back(kNaN);
  auto p = std::make_shared<DriftProfile>();
  ASSERT_TRUE(DriftProfile::Build({ref.data(), DType::kFloat64, ref.size(), 1},
                                  {FeatureKind::kCategorical}, {"color"}, {}, p.get())
                  .ok());
  const CategoricalProfile& cp = p->feature(0).categorical;
  EXPECT_EQ(cp.codes, (std::vector<int64_t>{3, 7, 9}));
  EXPECT_EQ(cp.counts, (std::vector<uint64_t>{30, 20, 50}));
  EXPECT_EQ(cp.missing, 1u);
  auto w = WindowOf(p);
  Feed(w.get(), cur);
  const FeatureDrift f = w->Statistics().features[0];
  EXPECT_EQ(f.m, 100u);
  EXPECT_EQ(f.nonfinite, 2u);
  EXPECT_DOUBLE_EQ(f.unseen_share, 0.1);
  // scipy.stats.chi2_contingency([[30,20,50,0],[25,25,40,10]], correction=False)
  EXPECT_NEAR(f.chi2, 12.121212121212121, 1e-12);
  EXPECT_NEAR(f.chi2_p, 0.0069792656333179885, 1e-15);
  EXPECT_EQ(f.chi2_dof, 3);
  EXPECT_NEAR(f.tvd, 0.5 * (0.05 + 0.05 + 0.10 + 0.10), 1e-15);
}

TEST(DriftCategoricalTest, SparseCodesUseBinarySearch) {
  std::vector<int64_t> ref = {-5000000000LL, 0, 17, 9000000000000LL, 17, 0};
  std::vector<int64_t> cur = {17, 17, 0, -5000000000LL, 42, 9000000000000LL, 9000000000001LL};
  auto p = std::make_shared<DriftProfile>();
  ASSERT_TRUE(DriftProfile::Build({ref.data(), DType::kInt64, ref.size(), 1},
                                  {FeatureKind::kCategorical}, {}, {}, p.get())
                  .ok());
  EXPECT_TRUE(p->categorical_index(0).dense.empty());
  auto w = WindowOf(p);
  ASSERT_TRUE(w->Update({cur.data(), DType::kInt64, cur.size(), 1}, 0).ok());
  EXPECT_EQ(w->Counts(0).coarse, (std::vector<uint64_t>{1, 1, 2, 1, 2}));
}

TEST(DriftCategoricalTest, NonIntegralReferenceIsRejected) {
  const std::vector<double> ref = {1.0, 2.5};
  DriftProfile p;
  EXPECT_EQ(DriftProfile::Build({ref.data(), DType::kFloat64, 2, 1}, {FeatureKind::kCategorical},
                                {}, {}, &p)
                .code(),
            StatusCode::kInvalidArgument);
}

TEST(DriftSerializationTest, RoundTripAndCorruption) {
  const size_t rows = 500;
  std::vector<double> data(rows * 2);
  const auto normal = Normal(rows, 2, 3, 19);
  for (size_t i = 0; i < rows; ++i) {
    data[2 * i] = normal[i];
    data[2 * i + 1] = static_cast<double>(i % 5);
  }
  data[0] = kNaN;
  DriftProfile p;
  ASSERT_TRUE(DriftProfile::Build({data.data(), DType::kFloat64, rows, 2},
                                  {FeatureKind::kNumeric, FeatureKind::kCategorical},
                                  {"x", "kind"}, {}, &p)
                  .ok());
  const std::string bytes = p.Serialize();
  DriftProfile q;
  ASSERT_TRUE(DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(bytes.data()),
                                        bytes.size(), &q)
                  .ok());
  EXPECT_EQ(q.Serialize(), bytes);
  EXPECT_EQ(q.feature(0).name, "x");
  EXPECT_EQ(q.feature(1).categorical.codes, p.feature(1).categorical.codes);
  EXPECT_EQ(q.feature(0).numeric.sketch_edges, p.feature(0).numeric.sketch_edges);
  for (size_t cut : {size_t{0}, size_t{3}, size_t{20}, bytes.size() / 2, bytes.size() - 1}) {
    EXPECT_FALSE(DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(bytes.data()), cut, &q)
                     .ok())
        << cut;
  }
  // A profile whose last feature is numeric (the block ends exactly at the checksum).
  const std::string numeric_only = ProfileOf(normal)->Serialize();
  ASSERT_TRUE(DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(numeric_only.data()),
                                        numeric_only.size(), &q)
                  .ok());
  EXPECT_EQ(q.Serialize(), numeric_only);
  std::string flipped = bytes;
  flipped[bytes.size() / 2] = static_cast<char>(flipped[bytes.size() / 2] ^ 0x10);
  EXPECT_FALSE(DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(flipped.data()),
                                         flipped.size(), &q)
                   .ok());
}

TEST(DriftMathTest, IncompleteGammaKnownValues) {
  // scipy.special.gammainc / gammaincc.
  struct Case {
    double a, x, p, q;
  };
  const Case cases[] = {
      {0.5, 0.3, 0.5614219739190003, 0.4385780260809997},
      {1, 2.5, 0.9179150013761012, 0.0820849986238988},
      {3, 2, 0.32332358381693654, 0.6766764161830634},
      {10, 15, 0.9301463393005901, 0.06985366069940986},
      {500, 520, 0.8153088509012563, 0.18469114909874365},
      {500, 480, 0.18628197319032458, 0.8137180268096754},
      {0.1, 1e-3, 0.526768568392445, 0.473231431607555},
  };
  for (const Case& c : cases) {
    EXPECT_NEAR(GammaP(c.a, c.x), c.p, 1e-12 * std::max(1.0, c.p)) << c.a << " " << c.x;
    EXPECT_NEAR(GammaQ(c.a, c.x), c.q, 1e-12) << c.a << " " << c.x;
    EXPECT_NEAR(GammaQ(c.a, c.x) / c.q, 1.0, 1e-11) << c.a << " " << c.x;
  }
  EXPECT_NEAR(GammaP(50, 1) / 1.2337508979097585e-65, 1.0, 1e-11);
  EXPECT_EQ(GammaP(2, 0), 0.0);
  EXPECT_EQ(GammaQ(2, 0), 1.0);
  EXPECT_TRUE(std::isnan(GammaP(0, 1)));
  EXPECT_TRUE(std::isnan(GammaQ(1, -1)));
  // Closed forms: Q(1, x) = e^-x; Q(0.5, x) = erfc(sqrt(x)).
  for (double x : {0.01, 0.5, 1.0, 7.0, 40.0}) {
    EXPECT_NEAR(GammaQ(1, x) / std::exp(-x), 1.0, 1e-12) << x;
    EXPECT_NEAR(GammaQ(0.5, x) / std::erfc(std::sqrt(x)), 1.0, 1e-11) << x;
  }
}

TEST(DriftMathTest, ChiSquareSurvivalKnownValues) {
  // scipy.stats.chi2.sf.
  EXPECT_NEAR(ChiSquareSf(3.841458820694124, 1), 0.05, 1e-14);
  EXPECT_NEAR(ChiSquareSf(18.307038053275146, 10), 0.05, 1e-14);
  EXPECT_NEAR(ChiSquareSf(1e-3, 1), 0.9747728793699604, 1e-14);
  EXPECT_NEAR(ChiSquareSf(100, 50) / 3.454931382984871e-05, 1.0, 1e-11);
  EXPECT_NEAR(ChiSquareSf(1000, 999), 0.48513148927490146, 1e-12);
  EXPECT_NEAR(ChiSquareSf(2000, 999) / 2.9249231493034897e-69, 1.0, 1e-9);
  EXPECT_NEAR(ChiSquareSf(0.5, 2), 0.7788007830714049, 1e-15);
  EXPECT_EQ(ChiSquareSf(0, 3), 1.0);
  const uint64_t ref[] = {30, 20, 50, 0}, cur[] = {25, 25, 40, 10};
  const ChiSquareResult r = ChiSquareHomogeneity(ref, cur, 4);
  EXPECT_NEAR(r.stat, 12.121212121212121, 1e-12);
  EXPECT_NEAR(r.p, 0.0069792656333179885, 1e-15);
  EXPECT_EQ(r.dof, 3);
  const uint64_t one_ref[] = {5, 0}, one_cur[] = {7, 0};
  const ChiSquareResult single = ChiSquareHomogeneity(one_ref, one_cur, 2);
  EXPECT_EQ(single.dof, 0);
  EXPECT_EQ(single.p, 1.0);
}

TEST(DriftMathTest, KolmogorovKnownValues) {
  // scipy.stats.kstwobign.sf.
  EXPECT_NEAR(KolmogorovSf(0.3), 0.9999906941986655, 1e-14);
  EXPECT_NEAR(KolmogorovSf(0.5), 0.9639452436648751, 1e-14);
  EXPECT_NEAR(KolmogorovSf(1.0), 0.26999967167735456, 1e-14);
  EXPECT_NEAR(KolmogorovSf(1.36), 0.049485876755377876, 1e-14);
  EXPECT_NEAR(KolmogorovSf(2.0), 0.0006709252557796953, 1e-16);
  EXPECT_NEAR(KolmogorovSf(3.0) / 3.045995948942526e-08, 1.0, 1e-12);
  EXPECT_EQ(KolmogorovSf(0), 1.0);
  EXPECT_EQ(KsPValue(0, 10, 10), 1.0);
  EXPECT_TRUE(std::isnan(KsPValue(0.5, 0, 10)));
}

TEST(DriftMathTest, AdjustPValues) {
  // scipy.stats.false_discovery_control([0.01, 0.04, 0.03, 0.2, 0.5]).
  const std::vector<double> p = {0.01, 0.04, 0.03, 0.2, 0.5};
  const std::vector<double> bh = AdjustPValues(p, Correction::kBenjaminiHochberg);
  const std::vector<double> expect = {0.05, 0.06666666666666667, 0.06666666666666667, 0.25, 0.5};
  for (size_t i = 0; i < p.size(); ++i) EXPECT_NEAR(bh[i], expect[i], 1e-15) << i;
  const std::vector<double> bonf = AdjustPValues({0.01, kNaN, 0.3}, Correction::kBonferroni);
  EXPECT_DOUBLE_EQ(bonf[0], 0.02);
  EXPECT_TRUE(std::isnan(bonf[1]));
  EXPECT_DOUBLE_EQ(bonf[2], 0.6);
  EXPECT_EQ(AdjustPValues(p, Correction::kNone), p);
}

TEST(DriftMathTest, CompareCountsMatchesTheDefinitions) {
  const uint64_t ref[] = {10, 30, 60, 0};
  const uint64_t cur[] = {20, 20, 50, 10};
  const BinnedDistances d = CompareCounts(ref, cur, 4);
  const double r[] = {0.1, 0.3, 0.6, 1e-4}, c[] = {0.2, 0.2, 0.5, 0.1};
  double psi = 0, kl = 0;
  for (int i = 0; i < 4; ++i) {
    psi += (c[i] - r[i]) * std::log(c[i] / r[i]);
    kl += r[i] * std::log(r[i] / c[i]);
  }
  EXPECT_NEAR(d.psi, psi, 1e-14);
  EXPECT_NEAR(d.kl, kl, 1e-14);
  EXPECT_NEAR(d.tvd, 0.2, 1e-15);
  const double rr[] = {0.1, 0.3, 0.6, 0}, bc = std::sqrt(0.02) + std::sqrt(0.06) + std::sqrt(0.3);
  EXPECT_NEAR(d.hellinger, std::sqrt(1 - bc), 1e-12);
  double js = 0;
  for (int i = 0; i < 4; ++i) {
    const double mid = 0.5 * (rr[i] + c[i]);
    if (rr[i] > 0) js += 0.5 * rr[i] * std::log2(rr[i] / mid);
    js += 0.5 * c[i] * std::log2(c[i] / mid);
  }
  EXPECT_NEAR(d.js, std::sqrt(js), 1e-14);
  const uint64_t zero[] = {0, 0, 0, 0};
  EXPECT_TRUE(std::isnan(CompareCounts(ref, zero, 4).psi));
}

TEST(DriftVerdictTest, DatasetDriftShare) {
  // Two features shifted, one not: share 2/3 >= 0.5.
  const size_t rows = 4000, cols = 3;
  std::mt19937_64 gen(30);
  std::normal_distribution<double> z;
  std::vector<double> ref(rows * cols), cur(rows * cols);
  for (double& v : ref) v = z(gen);
  for (size_t i = 0; i < rows; ++i) {
    cur[i * cols] = z(gen) + 1.0;
    cur[i * cols + 1] = z(gen) + 1.0;
    cur[i * cols + 2] = z(gen);
  }
  auto p = std::make_shared<DriftProfile>();
  ASSERT_TRUE(DriftProfile::Build({ref.data(), DType::kFloat64, rows, cols}, {}, {}, {}, p.get()).ok());
  auto w = WindowOf(p);
  ASSERT_TRUE(w->Update({cur.data(), DType::kFloat64, rows, cols}, 0).ok());
  const DriftReport r = w->Statistics();
  EXPECT_EQ(r.evaluated, 3);
  EXPECT_EQ(r.drifted, 2);
  EXPECT_EQ(r.features[2].verdict, Verdict::kNoDrift);
  EXPECT_EQ(r.dataset, Verdict::kDrift);
  VerdictOptions strict;
  strict.drift_share = 0.9;
  EXPECT_EQ(w->Statistics(strict).dataset, Verdict::kNoDrift);
}

}  // namespace
}  // namespace sluice::drift
