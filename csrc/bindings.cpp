// pybind11 layer of rest_fast._C: argument conversion and validation (type/shape, naming the argument),
// GIL release around every call into the core, numpy out without copies. Value checks (ranges, repeats,
// NaN) live in the core. The check order here mirrors rest_fast/cache/_pycache.py, so both classes
// raise the same exception for the same bad call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "caption_cache.hpp"
#include "topk_select.hpp"

namespace py = pybind11;
using rest_fast::CaptionCache;
using rest_fast::IndexView;

namespace {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string dtype_of(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

struct Index {
  py::array arr;  // keeps the buffer alive while the GIL is released
  IndexView view;
};

// Any integer dtype, any strides. int32/int64 in native byte order are used in place; other dtypes
// are converted to int64 (uint64 only after checking that every value fits).
Index as_index(py::handle obj, const char* name, int ndim, const char* layout) {
  py::module_ np = py::module_::import("numpy");
  py::array a = np.attr("asarray")(obj);
  char kind = a.dtype().kind();
  if (a.size() == 0 && kind == 'f') {  // np.asarray([]) is float64: an empty list is a fine index list
    a = a.attr("astype")(np.attr("int64"));
    kind = 'i';
  }
  if (kind != 'i' && kind != 'u')
    throw rest_fast::TypeError(std::string(name) + " must be an integer array, got dtype " + dtype_of(a));
  if (a.ndim() != ndim)
    throw rest_fast::ValueError(std::string(name) + " must be " + std::to_string(ndim) + "-D " + layout +
                                ", got shape " + shape_of(a));
  const bool native = a.dtype().attr("isnative").cast<bool>();
  const auto item = a.itemsize();
  if (!(native && kind == 'i' && (item == 4 || item == 8))) {
    if (kind == 'u' && item == 8 && a.size() > 0 &&
        a.attr("max")().cast<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      throw rest_fast::IndexError(std::string(name) + " holds a value >= 2**63, out of range");
    a = a.attr("astype")(np.attr("int64"));
  }
  IndexView v;
  v.data = static_cast<const char*>(a.data());
  v.rows = a.shape(0);
  v.cols = ndim == 2 ? a.shape(1) : 1;
  v.row_stride = a.strides(0);
  v.col_stride = ndim == 2 ? a.strides(1) : 0;
  v.wide = a.itemsize() == 8;
  return {a, v};
}

int64_t as_int(py::handle obj, const char* name, bool& overflow) {
  PyObject* idx = PyNumber_Index(obj.ptr());
  if (!idx) {
    PyErr_Clear();
    throw rest_fast::TypeError(std::string(name) + " must be an int, got " +
                               std::string(Py_TYPE(obj.ptr())->tp_name));
  }
  int of = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx, &of);
  Py_DECREF(idx);
  overflow = of != 0;
  return overflow ? 0 : static_cast<int64_t>(v);
}

int64_t as_id(py::handle obj, const char* name) {  // an int whose overflow means "out of range"
  bool of = false;
  const int64_t v = as_int(obj, name, of);
  if (of) throw rest_fast::IndexError(std::string(name) + " is out of range");
  return v;
}

py::str to_str(const std::string& s) { return py::str(s.data(), s.size()); }

template <class T>
py::array_t<T> adopt(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), owner);
}

py::array_t<int32_t> intern(CaptionCache& c, py::handle texts) {
  PyObject* o = texts.ptr();
  if (PyUnicode_Check(o) || PyBytes_Check(o) || PyByteArray_Check(o))
    throw rest_fast::TypeError("texts must be a sequence of str, not a single " +
                               std::string(Py_TYPE(o)->tp_name));
  // A tuple holds its own references: the strings stay alive while the GIL is released even if
  // another thread mutates the caller's list.
  PyObject* tup = PySequence_Tuple(o);
  if (!tup) throw py::error_already_set();  // e.g. TypeError: 'int' object is not iterable
  py::object hold = py::reinterpret_steal<py::object>(tup);
  const py::ssize_t n = PyTuple_GET_SIZE(tup);
  std::vector<std::string_view> views(static_cast<size_t>(n));
  for (py::ssize_t i = 0; i < n; ++i) {
    PyObject* s = PyTuple_GET_ITEM(tup, i);
    if (!PyUnicode_Check(s))
      throw rest_fast::TypeError("texts[" + std::to_string(i) + "] must be str, got " +
                                 std::string(Py_TYPE(s)->tp_name));
    Py_ssize_t len = 0;
    const char* u = PyUnicode_AsUTF8AndSize(s, &len);
    if (!u) {  // lone surrogates: not encodable as UTF-8
      py::error_already_set err;
      throw rest_fast::ValueError("texts[" + std::to_string(i) + "] cannot be encoded as UTF-8: " +
                                  std::string(err.what()));
    }
    views[i] = std::string_view(u, static_cast<size_t>(len));
  }
  py::array_t<int32_t> out(n);
  int32_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    c.intern(views, dst);
  }
  return out;
}

py::tuple get(const CaptionCache& c, py::handle videos) {
  Index v = as_index(videos, "videos", 1, "[n]");
  const py::ssize_t n = v.view.rows, k = c.k();
  py::array_t<int32_t> ids({n, k});
  py::array_t<float> scores({n, k});
  int32_t* di = ids.mutable_data();
  float* ds = scores.mutable_data();
  {
    py::gil_scoped_release release;
    c.get(v.view, di, ds);
  }
  return py::make_tuple(ids, scores);
}

void set(CaptionCache& c, py::handle videos, py::handle ids, py::handle scores) {
  Index v = as_index(videos, "videos", 1, "[n]");
  const py::ssize_t n = v.view.rows, k = c.k();
  Index i = as_index(ids, "ids", 2, "[n, k]");
  if (i.view.rows != n || i.view.cols != k)
    throw rest_fast::ValueError("ids must have shape (n, k) = (" + std::to_string(n) + ", " + std::to_string(k) +
                                "), got " + shape_of(i.arr));
  py::module_ np = py::module_::import("numpy");
  py::array s = np.attr("asarray")(scores);
  const char kind = s.dtype().kind();
  if (kind != 'f' && !(s.size() == 0 && (kind == 'i' || kind == 'u')))
    throw rest_fast::TypeError("scores must be a floating-point array, got dtype " + dtype_of(s));
  if (s.ndim() != 2 || s.shape(0) != n || s.shape(1) != k)
    throw rest_fast::ValueError("scores must have shape (n, k) = (" + std::to_string(n) + ", " + std::to_string(k) +
                                "), got " + shape_of(s));
  py::array_t<float> sc = np.attr("ascontiguousarray")(s, np.attr("float32"));
  const float* ps = sc.data();
  py::gil_scoped_release release;
  c.set(v.view, i.view, ps);
}

void add_pending(CaptionCache& c, py::handle videos, py::handle ids) {
  Index v = as_index(videos, "videos", 1, "[n]");
  Index i = as_index(ids, "ids", 1, "[n]");
  if (i.view.rows != v.view.rows)
    throw rest_fast::ValueError("ids must have shape (n,) = (" + std::to_string(v.view.rows) + ",), got " +
                                shape_of(i.arr));
  py::gil_scoped_release release;
  c.add_pending(v.view, i.view);
}

py::array_t<int32_t> candidates(const CaptionCache& c, py::handle videos, py::handle neighbours) {
  Index v = as_index(videos, "videos", 1, "[n]");
  Index nb = as_index(neighbours, "neighbours", 2, "[n, H]");
  if (nb.view.rows != v.view.rows)
    throw rest_fast::ValueError("neighbours must have n = " + std::to_string(v.view.rows) + " rows, got shape " +
                                shape_of(nb.arr));
  rest_fast::PooledIds out;
  int64_t L = 0;
  {
    py::gil_scoped_release release;
    out = c.candidates(v.view, nb.view, L);
  }
  int32_t* data = out.get();
  // The array owns the pooled block; freeing the array hands it back to the cache's pool.
  auto* holder = new rest_fast::PooledIds(std::move(out));
  py::capsule owner(holder, [](void* p) { delete static_cast<rest_fast::PooledIds*>(p); });
  return py::array_t<int32_t>({v.view.rows, static_cast<py::ssize_t>(L)}, data, owner);
}

py::array_t<int32_t> sample(const CaptionCache& c, py::handle videos, py::handle seed) {
  Index v = as_index(videos, "videos", 1, "[n]");
  PyObject* idx = PyNumber_Index(seed.ptr());
  if (!idx) {
    PyErr_Clear();
    throw rest_fast::TypeError("seed must be an int, got " + std::string(Py_TYPE(seed.ptr())->tp_name));
  }
  const uint64_t s = PyLong_AsUnsignedLongLongMask(idx);  // seed mod 2**64, negative seeds included
  Py_DECREF(idx);
  py::array_t<int32_t> out(v.view.rows);
  int32_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    c.sample(v.view, s, dst);
  }
  return out;
}

py::list history(const CaptionCache& c, py::handle video) {
  const int64_t v = as_id(video, "video");
  std::vector<std::pair<int64_t, std::vector<std::string>>> h;
  {
    py::gil_scoped_release release;
    h = c.history(v);
  }
  py::list out;
  for (const auto& [round, texts] : h) {
    py::list t;
    for (const auto& s : texts) t.append(to_str(s));
    out.append(py::make_tuple(round, t));
  }
  return out;
}

std::string as_path(py::handle path) {
  py::module_ os = py::module_::import("os");
  return os.attr("fsdecode")(os.attr("fspath")(path)).cast<std::string>();
}

// A float32 / int64 numpy buffer used in place: right dtype, 2-D, unit column stride, writable. Never
// converted (a silent copy would drop the results or the in-place exclusion).
template <class T>
T* buffer_2d(py::array& a, const char* name, int64_t rows, int64_t cols, int64_t& ld) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().attr("isnative").cast<bool>())
    throw rest_fast::TypeError(std::string(name) + " must be a native " +
                               py::str(py::dtype::of<T>()).cast<std::string>() + " array, got " + dtype_of(a));
  if (a.ndim() != 2 || a.shape(0) != rows || (cols >= 0 && a.shape(1) != cols))
    throw rest_fast::ValueError(std::string(name) + " must have shape (" + std::to_string(rows) + ", " +
                                (cols >= 0 ? std::to_string(cols) : std::string("n")) + "), got " + shape_of(a));
  if (!a.writeable()) throw rest_fast::ValueError(std::string(name) + " must be writable");
  if (a.shape(1) > 1 && a.strides(1) != static_cast<py::ssize_t>(sizeof(T)))
    throw rest_fast::ValueError(std::string(name) + " must have unit column stride");
  if (a.strides(0) % static_cast<py::ssize_t>(sizeof(T)) != 0 || a.strides(0) < 0)
    throw rest_fast::ValueError(std::string(name) + " has an unsupported row stride");
  ld = a.shape(0) > 1 ? a.strides(0) / static_cast<py::ssize_t>(sizeof(T)) : a.shape(1);
  return static_cast<T*>(a.mutable_data());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rest_fast native extension: the C++ caption cache (see rest_fast.cache).";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const rest_fast::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const rest_fast::OSError& e) {
      // OSError(errno, ...) picks the right subclass (FileNotFoundError, IsADirectoryError, ...).
      py::object exc = py::handle(PyExc_OSError)(e.errnum, e.what(), e.filename);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    }
  });

  m.def("normalize_caption", [](const std::string& s) { return to_str(rest_fast::normalize_caption(s)); },
        py::arg("text"), "C++ normalisation (tests compare it with rest_fast.cache.normalize_caption).");
  m.def("_crc32", [](py::bytes b, uint32_t value) {
    std::string_view s = b;
    return rest_fast::crc32_update(value, s.data(), s.size());
  }, py::arg("data"), py::arg("value") = 0);
  m.def("_splitmix64", [](uint64_t x) { return rest_fast::splitmix64(x); });

  py::class_<CaptionCache>(m, "CaptionCache", R"doc(
Native caption cache (C++). Same API and behaviour as rest_fast.cache.PyCaptionCache; see
rest_fast.cache for the full contract. Bulk calls release the GIL and run on all cores.)doc")
      .def(py::init([](py::handle num_videos, py::handle k) {
             bool of1 = false, of2 = false;
             const int64_t n = as_int(num_videos, "num_videos", of1);
             const int64_t kk = as_int(k, "k", of2);
             if (of1) throw rest_fast::ValueError("num_videos is out of range");
             if (of2) throw rest_fast::ValueError("k is out of range");
             return new CaptionCache(n, kk);
           }),
           py::arg("num_videos"), py::arg("k"))
      .def_property_readonly("num_videos", &CaptionCache::num_videos)
      .def_property_readonly("k", &CaptionCache::k)
      .def_property_readonly("version", &CaptionCache::version)
      .def_property_readonly("nbytes", &CaptionCache::nbytes,
                             "Bytes held by the caption store (arena + offsets + hash table).")
      .def_property_readonly("rounds", [](const CaptionCache& c) {
             py::list out;
             for (int64_t r : c.rounds()) out.append(r);
             return out;
           }, "Rounds with a snapshot, increasing.")
      .def("__len__", &CaptionCache::size)
      .def("__repr__", [](const CaptionCache& c) {
        return "CaptionCache(num_videos=" + std::to_string(c.num_videos()) + ", k=" + std::to_string(c.k()) +
               ", captions=" + std::to_string(c.size()) + ", native)";
      })
      .def("intern", &intern, py::arg("texts"))
      .def("text", [](const CaptionCache& c, py::handle id) { return to_str(c.text(as_id(id, "id"))); },
           py::arg("id"))
      .def("texts", [](const CaptionCache& c, py::handle ids) {
             Index i = as_index(ids, "ids", 1, "[n]");
             std::vector<std::string> t;
             {
               py::gil_scoped_release release;
               t = c.texts(i.view);
             }
             py::list out(t.size());
             for (size_t j = 0; j < t.size(); ++j) out[j] = to_str(t[j]);
             return out;
           }, py::arg("ids"))
      .def("new_since", [](const CaptionCache& c, py::handle version) {
             bool of = false;
             const int64_t v = as_int(version, "version", of);
             if (of) throw rest_fast::ValueError("version is out of range");
             std::vector<int32_t> ids = c.new_since(v);
             const auto n = static_cast<py::ssize_t>(ids.size());
             return adopt(std::move(ids), {n});
           }, py::arg("version"))
      .def("get", &get, py::arg("videos"))
      .def("set", &set, py::arg("videos"), py::arg("ids"), py::arg("scores"))
      .def("add_pending", &add_pending, py::arg("videos"), py::arg("ids"))
      .def("candidates", &candidates, py::arg("videos"), py::arg("neighbours"))
      .def("sample", &sample, py::arg("videos"), py::arg("seed"))
      .def("snapshot_round", [](CaptionCache& c, py::handle round) {
             bool of = false;
             const int64_t r = as_int(round, "round", of);
             if (of) throw rest_fast::ValueError("round is out of range");
             py::gil_scoped_release release;
             c.snapshot_round(r);
           }, py::arg("round"))
      .def("history", &history, py::arg("video"))
      .def("save", [](const CaptionCache& c, py::handle path) {
             const std::string p = as_path(path);
             py::gil_scoped_release release;
             c.save(p);
           }, py::arg("path"))
      .def_static("load", [](py::handle path, bool mmap) {
             const std::string p = as_path(path);
             py::gil_scoped_release release;
             return CaptionCache::load(p, mmap);
           }, py::arg("path"), py::arg("mmap") = false);

  py::class_<rest_fast::TopkSelector>(m, "TopkSelector", R"doc(
Exact per-row top-k over blocks of float32 scores (the CPU selection step of
rest_fast.ops.topk_similarity; see rest_fast/ops/topk_cpu.py). Order: score descending, then key index
ascending. Buffers are used in place (no copies); calls release the GIL and use `threads` threads.)doc")
      .def(py::init([](int64_t max_rows, int64_t k) {
             if (max_rows < 1) throw rest_fast::ValueError("max_rows must be >= 1, got " + std::to_string(max_rows));
             if (k < 1) throw rest_fast::ValueError("k must be >= 1, got " + std::to_string(k));
             return new rest_fast::TopkSelector(max_rows, k);
           }), py::arg("max_rows"), py::arg("k"))
      .def_property_readonly("k", &rest_fast::TopkSelector::k)
      .def_property_readonly("cap", &rest_fast::TopkSelector::cap)
      .def_property_readonly("max_rows", &rest_fast::TopkSelector::max_rows)
      .def("reset", [](rest_fast::TopkSelector& s, int64_t rows) {
             if (rows < 0 || rows > s.max_rows())
               throw rest_fast::ValueError("rows must be in [0, " + std::to_string(s.max_rows()) + "], got " +
                                           std::to_string(rows));
             s.reset(rows);
           }, py::arg("rows"))
      .def("push", [](rest_fast::TopkSelector& s, py::array scores, int64_t n0, py::object exclude, int threads) {
             int64_t ld = 0;
             float* p = buffer_2d<float>(scores, "scores", s.rows(), -1, ld);
             const int64_t nb = scores.shape(1);
             const int64_t* ex = nullptr;
             py::array exa;
             if (!exclude.is_none()) {
               exa = py::reinterpret_borrow<py::array>(exclude);
               if (!py::isinstance<py::array_t<int64_t>>(exa) || exa.ndim() != 1 || exa.shape(0) != s.rows() ||
                   !(exa.flags() & py::array::c_style))
                 throw rest_fast::ValueError("exclude must be a contiguous int64 array of shape (" +
                                             std::to_string(s.rows()) + ",)");
               ex = static_cast<const int64_t*>(exa.data());
             }
             if (n0 < 0) throw rest_fast::ValueError("n0 must be >= 0");
             py::gil_scoped_release release;
             try {
               s.push(p, nb, ld, n0, ex, std::max(1, threads));
             } catch (const std::invalid_argument& e) {
               throw rest_fast::ValueError(e.what());
             }
           }, py::arg("scores"), py::arg("n0"), py::arg("exclude") = py::none(), py::arg("threads") = 1)
      .def("finish", [](rest_fast::TopkSelector& s, py::array out_scores, py::array out_index, int threads) {
             int64_t lds = 0, ldi = 0;
             float* ps = buffer_2d<float>(out_scores, "out_scores", s.rows(), s.k(), lds);
             int64_t* pi = buffer_2d<int64_t>(out_index, "out_index", s.rows(), s.k(), ldi);
             py::gil_scoped_release release;
             try {
               s.finish(ps, lds, pi, ldi, std::max(1, threads));
             } catch (const std::invalid_argument& e) {
               throw rest_fast::ValueError(e.what());
             }
           }, py::arg("out_scores"), py::arg("out_index"), py::arg("threads") = 1);
}
