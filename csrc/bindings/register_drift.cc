// Drift statistics: reference profiles, streaming windows and the statistics
// between them (csrc/include/sluice/drift.h). Arrays come in as numpy arrays of
// any numeric dtype, C-contiguous, 1-D (one feature) or 2-D (rows x features);
// updates and statistics run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "sluice/drift.h"
#include "status_error.h"

namespace py = pybind11;

namespace sluice::bindings {
namespace {

using drift::DType;
using drift::MatrixView;

[[noreturn]] void Invalid(const std::string& message) {
  throw StatusException(Status::InvalidArgument(message));
}

DType DTypeOf(const py::array& a) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  constexpr char kForeign = '<';
#else
  constexpr char kForeign = '>';
#endif
  if (a.dtype().byteorder() == kForeign) {
    Invalid("non-native byte order " + std::string(py::str(a.dtype())) +
            " (use arr.astype(arr.dtype.newbyteorder('=')))");
  }
  const char kind = a.dtype().kind();
  const py::ssize_t size = a.itemsize();
  if (kind == 'f' && size == 4) return DType::kFloat32;
  if (kind == 'f' && size == 8) return DType::kFloat64;
  if (kind == 'b' && size == 1) return DType::kBool;
  if (kind == 'i') {
    if (size == 1) return DType::kInt8;
    if (size == 2) return DType::kInt16;
    if (size == 4) return DType::kInt32;
    if (size == 8) return DType::kInt64;
  }
  if (kind == 'u') {
    if (size == 1) return DType::kUInt8;
    if (size == 2) return DType::kUInt16;
    if (size == 4) return DType::kUInt32;
    if (size == 8) return DType::kUInt64;
  }
  Invalid("unsupported dtype " + std::string(py::str(a.dtype())) +
          " (float32/64, int8-64, uint8-64 or bool)");
}

// A view of a 1-D (one column) or 2-D C-contiguous array; `a` must outlive it.
MatrixView ViewOf(const py::array& a, const char* what) {
  if (a.ndim() != 1 && a.ndim() != 2) {
    Invalid(std::string(what) + " must be 1-D or 2-D, got " + std::to_string(a.ndim()) + "-D");
  }
  if (!(a.flags() & py::array::c_style)) {
    Invalid(std::string(what) + " must be C-contiguous (np.ascontiguousarray)");
  }
  MatrixView v;
  v.dtype = DTypeOf(a);
  v.data = a.data();
  v.rows = static_cast<size_t>(a.shape(0));
  v.cols = a.ndim() == 2 ? static_cast<size_t>(a.shape(1)) : 1;
  return v;
}

template <typename T>
py::array_t<T> ToArray(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

std::vector<uint64_t> CountsOf(const py::array& a, const char* what) {
  py::array_t<uint64_t, py::array::c_style | py::array::forcecast> c(a);
  if (c.ndim() != 1) Invalid(std::string(what) + " must be 1-D");
  return std::vector<uint64_t>(c.data(), c.data() + c.size());
}

using ProfilePtr = std::shared_ptr<drift::DriftProfile>;

ProfilePtr BuildProfile(const py::array& data, std::optional<std::vector<drift::FeatureKind>> kinds,
                        std::optional<std::vector<std::string>> names, int32_t bins,
                        int32_t sketch_points) {
  const MatrixView view = ViewOf(data, "reference");
  drift::ProfileOptions options;
  options.bins = bins;
  options.sketch_points = sketch_points;
  const std::vector<drift::FeatureKind> k = kinds.value_or(std::vector<drift::FeatureKind>{});
  const std::vector<std::string> n = names.value_or(std::vector<std::string>{});
  auto out = std::make_shared<drift::DriftProfile>();
  Status st;
  {
    // The array stays referenced by the caller's frame.
    py::gil_scoped_release release;
    st = drift::DriftProfile::Build(view, k, n, options, out.get());
  }
  ThrowIfError(st);
  return out;
}

ProfilePtr ProfileFromBytes(const py::bytes& data) {
  const std::string_view s = data;
  auto out = std::make_shared<drift::DriftProfile>();
  ThrowIfError(drift::DriftProfile::Deserialize(reinterpret_cast<const uint8_t*>(s.data()),
                                                s.size(), out.get()));
  return out;
}

void CheckFeature(const drift::DriftProfile& p, size_t i, drift::FeatureKind kind) {
  if (i >= p.num_features()) {
    throw py::index_error("feature " + std::to_string(i) + " of " +
                          std::to_string(p.num_features()));
  }
  if (p.feature(i).kind != kind) {
    Invalid("feature " + std::to_string(i) + " is " +
            (kind == drift::FeatureKind::kNumeric ? "categorical" : "numeric"));
  }
}

// The window plus a mutex: calls from several Python threads (which run
// without the GIL inside) are serialised.
class PyDriftWindow {
 public:
  PyDriftWindow(ProfilePtr profile, uint64_t pane_rows, int64_t pane_ns, uint32_t panes)
      : profile_(std::move(profile)) {
    drift::WindowOptions options;
    options.pane_rows = pane_rows;
    options.pane_ns = pane_ns;
    options.panes = panes;
    ThrowIfError(drift::StreamingWindow::Create(profile_, options, &window_));
  }

  void Update(const py::array& batch, int64_t now_ns) {
    const MatrixView view = ViewOf(batch, "batch");
    Status st;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(mu_);
      st = window_->Update(view, now_ns);
    }
    ThrowIfError(st);
  }

  void Advance(int64_t now_ns) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mu_);
    window_->Advance(now_ns);
  }

  void Merge(PyDriftWindow& other) {
    if (&other == this) Invalid("cannot merge a window into itself");
    Status st;
    {
      py::gil_scoped_release release;
      std::scoped_lock lock(mu_, other.mu_);
      st = window_->Merge(*other.window_);
    }
    ThrowIfError(st);
  }

  void Reset() {
    std::lock_guard<std::mutex> lock(mu_);
    window_->Reset();
  }

  uint64_t Rows() {
    std::lock_guard<std::mutex> lock(mu_);
    return window_->rows();
  }

  drift::DriftReport Statistics(std::optional<drift::VerdictOptions> options,
                                std::optional<int64_t> now_ns) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mu_);
    if (now_ns) window_->Advance(*now_ns);
    return window_->Statistics(options.value_or(drift::VerdictOptions()));
  }

  py::tuple Counts(size_t feature) {
    if (feature >= profile_->num_features()) {
      throw py::index_error("feature " + std::to_string(feature));
    }
    drift::FeatureCounts c;
    {
      std::lock_guard<std::mutex> lock(mu_);
      c = window_->Counts(feature);
    }
    return py::make_tuple(ToArray(c.coarse), ToArray(c.fine), ToArray(c.fine_sums), c.nonfinite);
  }

  const ProfilePtr& profile() const { return profile_; }
  const drift::WindowOptions& options() const { return window_->options(); }

 private:
  ProfilePtr profile_;
  std::unique_ptr<drift::StreamingWindow> window_;
  std::mutex mu_;
};

}  // namespace

void register_drift(py::module_& m) {
  py::enum_<drift::FeatureKind>(m, "FeatureKind")
      .value("NUMERIC", drift::FeatureKind::kNumeric)
      .value("CATEGORICAL", drift::FeatureKind::kCategorical);
  py::enum_<drift::DriftRule>(m, "DriftRule")
      .value("PSI", drift::DriftRule::kPsi)
      .value("P_VALUE", drift::DriftRule::kPValue)
      .value("PSI_AND_P_VALUE", drift::DriftRule::kPsiAndPValue)
      .value("PSI_OR_P_VALUE", drift::DriftRule::kPsiOrPValue);
  py::enum_<drift::Correction>(m, "Correction")
      .value("NONE", drift::Correction::kNone)
      .value("BONFERRONI", drift::Correction::kBonferroni)
      .value("BENJAMINI_HOCHBERG", drift::Correction::kBenjaminiHochberg);
  py::enum_<drift::Verdict>(m, "Verdict")
      .value("NO_DRIFT", drift::Verdict::kNoDrift)
      .value("DRIFT", drift::Verdict::kDrift)
      .value("INSUFFICIENT_DATA", drift::Verdict::kInsufficientData);

  py::class_<drift::NumericProfile>(m, "NumericProfile")
      .def_readonly("bins", &drift::NumericProfile::bins)
      .def_readonly("sketch_points", &drift::NumericProfile::sketch_points)
      .def_readonly("n", &drift::NumericProfile::n)
      .def_readonly("nonfinite", &drift::NumericProfile::nonfinite)
      .def_readonly("mean", &drift::NumericProfile::mean)
      .def_readonly("m2", &drift::NumericProfile::m2)
      .def_readonly("min", &drift::NumericProfile::min)
      .def_readonly("max", &drift::NumericProfile::max)
      .def_property_readonly("variance", &drift::NumericProfile::variance)
      .def_property_readonly("stddev", &drift::NumericProfile::stddev)
      .def_property_readonly("edges", [](const drift::NumericProfile& p) { return ToArray(p.edges); })
      .def_property_readonly("counts", [](const drift::NumericProfile& p) { return ToArray(p.counts); })
      .def_property_readonly("sketch_edges",
                             [](const drift::NumericProfile& p) { return ToArray(p.sketch_edges); })
      .def_property_readonly("sketch_counts",
                             [](const drift::NumericProfile& p) { return ToArray(p.sketch_counts); })
      .def_property_readonly("sketch_sums",
                             [](const drift::NumericProfile& p) { return ToArray(p.sketch_sums); });

  py::class_<drift::CategoricalProfile>(m, "CategoricalProfile")
      .def_readonly("n", &drift::CategoricalProfile::n)
      .def_readonly("missing", &drift::CategoricalProfile::missing)
      .def_property_readonly("codes", [](const drift::CategoricalProfile& p) { return ToArray(p.codes); })
      .def_property_readonly("counts",
                             [](const drift::CategoricalProfile& p) { return ToArray(p.counts); });

  py::class_<drift::DriftProfile, ProfilePtr>(m, "DriftProfile")
      .def_static("build", &BuildProfile, py::arg("data"), py::arg("kinds") = std::nullopt,
                  py::arg("names") = std::nullopt, py::arg("bins") = 10,
                  py::arg("sketch_points") = 1000,
                  "Profile every column of a reference array (GIL released).")
      .def_static("from_bytes", &ProfileFromBytes, py::arg("data"))
      .def("to_bytes",
           [](const drift::DriftProfile& p) {
             std::string s = p.Serialize();
             return py::bytes(s);
           })
      .def_property_readonly("num_features", &drift::DriftProfile::num_features)
      .def("__len__", &drift::DriftProfile::num_features)
      .def_property_readonly("names",
                             [](const drift::DriftProfile& p) {
                               std::vector<std::string> out;
                               for (size_t i = 0; i < p.num_features(); ++i) out.push_back(p.feature(i).name);
                               return out;
                             })
      .def_property_readonly("kinds",
                             [](const drift::DriftProfile& p) {
                               std::vector<drift::FeatureKind> out;
                               for (size_t i = 0; i < p.num_features(); ++i) out.push_back(p.feature(i).kind);
                               return out;
                             })
      .def("numeric",
           [](const drift::DriftProfile& p, size_t i) {
             CheckFeature(p, i, drift::FeatureKind::kNumeric);
             return p.feature(i).numeric;
           },
           py::arg("feature"))
      .def("categorical",
           [](const drift::DriftProfile& p, size_t i) {
             CheckFeature(p, i, drift::FeatureKind::kCategorical);
             return p.feature(i).categorical;
           },
           py::arg("feature"));

  py::class_<drift::VerdictOptions>(m, "VerdictOptions")
      .def(py::init<>())
      .def_readwrite("rule", &drift::VerdictOptions::rule)
      .def_readwrite("psi_threshold", &drift::VerdictOptions::psi_threshold)
      .def_readwrite("alpha", &drift::VerdictOptions::alpha)
      .def_readwrite("correction", &drift::VerdictOptions::correction)
      .def_readwrite("drift_share", &drift::VerdictOptions::drift_share)
      .def_readwrite("min_rows_per_bin", &drift::VerdictOptions::min_rows_per_bin);

  py::class_<drift::FeatureDrift>(m, "FeatureDrift")
      .def_readonly("kind", &drift::FeatureDrift::kind)
      .def_readonly("n", &drift::FeatureDrift::n)
      .def_readonly("m", &drift::FeatureDrift::m)
      .def_readonly("nonfinite", &drift::FeatureDrift::nonfinite)
      .def_readonly("nonfinite_rate_ref", &drift::FeatureDrift::nonfinite_rate_ref)
      .def_readonly("nonfinite_rate", &drift::FeatureDrift::nonfinite_rate)
      .def_readonly("nonfinite_rate_change", &drift::FeatureDrift::nonfinite_rate_change)
      .def_readonly("mean", &drift::FeatureDrift::mean)
      .def_readonly("stddev", &drift::FeatureDrift::stddev)
      .def_readonly("min", &drift::FeatureDrift::min)
      .def_readonly("max", &drift::FeatureDrift::max)
      .def_readonly("psi", &drift::FeatureDrift::psi)
      .def_readonly("kl", &drift::FeatureDrift::kl)
      .def_readonly("js", &drift::FeatureDrift::js)
      .def_readonly("hellinger", &drift::FeatureDrift::hellinger)
      .def_readonly("tvd", &drift::FeatureDrift::tvd)
      .def_readonly("ks_d", &drift::FeatureDrift::ks_d)
      .def_readonly("ks_d_bound", &drift::FeatureDrift::ks_d_bound)
      .def_readonly("ks_p", &drift::FeatureDrift::ks_p)
      .def_readonly("wasserstein", &drift::FeatureDrift::wasserstein)
      .def_readonly("wasserstein_normed", &drift::FeatureDrift::wasserstein_normed)
      .def_readonly("wasserstein_bound", &drift::FeatureDrift::wasserstein_bound)
      .def_readonly("chi2", &drift::FeatureDrift::chi2)
      .def_readonly("chi2_p", &drift::FeatureDrift::chi2_p)
      .def_readonly("chi2_dof", &drift::FeatureDrift::chi2_dof)
      .def_readonly("out_of_range_share", &drift::FeatureDrift::out_of_range_share)
      .def_readonly("unseen_share", &drift::FeatureDrift::unseen_share)
      .def_readonly("bins", &drift::FeatureDrift::bins)
      .def_readonly("p_value", &drift::FeatureDrift::p_value)
      .def_readonly("p_adjusted", &drift::FeatureDrift::p_adjusted)
      .def_readonly("verdict", &drift::FeatureDrift::verdict);

  py::class_<drift::DriftReport>(m, "DriftReport")
      .def_readonly("features", &drift::DriftReport::features)
      .def_readonly("rows", &drift::DriftReport::rows)
      .def_readonly("oldest_pane_ns", &drift::DriftReport::oldest_pane_ns)
      .def_readonly("latest_ns", &drift::DriftReport::latest_ns)
      .def_readonly("evaluated", &drift::DriftReport::evaluated)
      .def_readonly("drifted", &drift::DriftReport::drifted)
      .def_readonly("drift_share", &drift::DriftReport::drift_share)
      .def_readonly("dataset", &drift::DriftReport::dataset);

  py::class_<PyDriftWindow>(m, "DriftWindow")
      .def(py::init<ProfilePtr, uint64_t, int64_t, uint32_t>(), py::arg("profile"),
           py::arg("pane_rows") = 0, py::arg("pane_ns") = 0, py::arg("panes") = 1)
      .def("update", &PyDriftWindow::Update, py::arg("batch"), py::arg("now_ns") = 0,
           "Add a rows x features batch (GIL released).")
      .def("advance", &PyDriftWindow::Advance, py::arg("now_ns"))
      .def("merge", &PyDriftWindow::Merge, py::arg("other"))
      .def("reset", &PyDriftWindow::Reset)
      .def_property_readonly("rows", &PyDriftWindow::Rows)
      .def_property_readonly("profile", &PyDriftWindow::profile)
      .def_property_readonly("pane_rows", [](const PyDriftWindow& w) { return w.options().pane_rows; })
      .def_property_readonly("pane_ns", [](const PyDriftWindow& w) { return w.options().pane_ns; })
      .def_property_readonly("panes", [](const PyDriftWindow& w) { return w.options().panes; })
      .def("statistics", &PyDriftWindow::Statistics, py::arg("options") = std::nullopt,
           py::arg("now_ns") = std::nullopt,
           "Every statistic against the reference (GIL released); advances to now_ns first if given.")
      .def("counts", &PyDriftWindow::Counts, py::arg("feature"),
           "(coarse counts, fine counts, fine anchored sums, non-finite count) of one feature.");

  m.def("drift_gamma_p", &drift::GammaP, py::arg("a"), py::arg("x"));
  m.def("drift_gamma_q", &drift::GammaQ, py::arg("a"), py::arg("x"));
  m.def("drift_chi2_sf", &drift::ChiSquareSf, py::arg("stat"), py::arg("dof"));
  m.def("drift_kolmogorov_sf", &drift::KolmogorovSf, py::arg("lam"));
  m.def("drift_ks_p_value", &drift::KsPValue, py::arg("d"), py::arg("n"), py::arg("m"));
  m.def("drift_adjust_p_values", &drift::AdjustPValues, py::arg("p"), py::arg("correction"));
  m.def(
      "drift_compare_counts",
      [](const py::array& ref, const py::array& cur, double eps) {
        const std::vector<uint64_t> r = CountsOf(ref, "ref"), c = CountsOf(cur, "cur");
        if (r.size() != c.size()) Invalid("ref and cur differ in length");
        const drift::BinnedDistances d = drift::CompareCounts(r.data(), c.data(), r.size(), eps);
        return std::make_tuple(d.psi, d.kl, d.js, d.hellinger, d.tvd);
      },
      py::arg("ref"), py::arg("cur"), py::arg("eps") = 1e-4,
      "(psi, kl, js, hellinger, tvd) of two count vectors.");
  m.def(
      "drift_chi2_homogeneity",
      [](const py::array& ref, const py::array& cur) {
        const std::vector<uint64_t> r = CountsOf(ref, "ref"), c = CountsOf(cur, "cur");
        if (r.size() != c.size()) Invalid("ref and cur differ in length");
        const drift::ChiSquareResult x = drift::ChiSquareHomogeneity(r.data(), c.data(), r.size());
        return std::make_tuple(x.stat, x.p, x.dof);
      },
      py::arg("ref"), py::arg("cur"), "(stat, p, dof) of the 2 x k homogeneity test.");
}

}  // namespace sluice::bindings
