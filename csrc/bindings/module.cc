// sluice._core: thin pybind11 bindings over the C++ core. Each area registers
// itself from its own register_<area>.cc.
#include <pybind11/pybind11.h>

#include "status_error.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "sluice C++ core: clock, status, tensor wire codecs, dynamic batcher, drift statistics";
  sluice::bindings::register_status(m);
  sluice::bindings::register_clock(m);
  sluice::bindings::register_bytes_codec(m);
  sluice::bindings::register_batcher(m);
  sluice::bindings::register_drift(m);
#ifdef SLUICE_VERSION
  m.attr("__version__") = SLUICE_VERSION;
#endif
}
