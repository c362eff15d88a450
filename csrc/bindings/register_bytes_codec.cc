#include <pybind11/pybind11.h>

#include <string>
#include <string_view>
#include <vector>

#include "sluice/bytes_codec.h"
#include "status_error.h"

namespace py = pybind11;

namespace sluice::bindings {
namespace {

// Splits a length-prefixed BYTES buffer into `count` Python objects: str when
// `as_text` (onnxruntime string tensors take text; each element must be
// UTF-8), bytes otherwise. The buffer is only read.
py::list DecodeBytes(const py::buffer& data, size_t count, bool as_text) {
  py::buffer_info info = data.request();
  const auto* base = static_cast<const uint8_t*>(info.ptr);
  const size_t size = static_cast<size_t>(info.size * info.itemsize);
  std::vector<ByteSpan> spans;
  Status status;
  {
    // Safe without the GIL: `data` stays referenced by the caller's frame.
    py::gil_scoped_release release;
    status = ParseLengthPrefixed(base, size, count, &spans);
  }
  ThrowIfError(status);
  py::list out(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) {
    const char* p = reinterpret_cast<const char*>(base + spans[i].offset);
    if (as_text) {
      if (!IsValidUtf8(std::string_view(p, spans[i].size))) {
        ThrowIfError(Status::InvalidArgument(
            "BYTES element " + std::to_string(i) +
            " is not valid UTF-8 (onnxruntime string tensors hold text)"));
      }
      out[i] = py::reinterpret_steal<py::object>(
          PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(spans[i].size), "strict"));
    } else {
      out[i] = py::bytes(p, spans[i].size);
    }
  }
  return out;
}

// Serializes an iterable of str (as UTF-8) or bytes into one buffer.
py::bytes EncodeBytes(const py::iterable& elements) {
  std::vector<std::string_view> views;
  std::vector<py::object> keep_alive;  // views borrow from these objects
  for (py::handle item : elements) {
    if (PyUnicode_Check(item.ptr())) {
      Py_ssize_t n = 0;
      const char* p = PyUnicode_AsUTF8AndSize(item.ptr(), &n);
      if (p == nullptr) throw py::error_already_set();
      views.emplace_back(p, static_cast<size_t>(n));
    } else if (PyBytes_Check(item.ptr())) {
      views.emplace_back(PyBytes_AS_STRING(item.ptr()),
                         static_cast<size_t>(PyBytes_GET_SIZE(item.ptr())));
    } else {
      ThrowIfError(Status::InvalidArgument(
          std::string("BYTES elements must be str or bytes, got ") +
          Py_TYPE(item.ptr())->tp_name));
    }
    keep_alive.push_back(py::reinterpret_borrow<py::object>(item));
  }
  const size_t total = LengthPrefixedSize(views);
  py::bytes out(nullptr, total);
  auto* dst = reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(out.ptr()));
  ThrowIfError(WriteLengthPrefixed(views, dst));
  return out;
}

}  // namespace

void register_bytes_codec(py::module_& m) {
  m.def("decode_bytes_tensor", &DecodeBytes, py::arg("data"), py::arg("count"),
        py::arg("as_text"),
        "Split a length-prefixed BYTES buffer into `count` str (as_text) or bytes objects.");
  m.def("encode_bytes_tensor", &EncodeBytes, py::arg("elements"),
        "Length-prefix and concatenate str (UTF-8) or bytes elements.");
}

}  // namespace sluice::bindings
