// The fused CPU ops as one Python module (cpu_ops.py builds and loads it).

#include "steps.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // every call runs without the GIL, as torch's own ops do: a decode step holds no Python
  // lock for its tens of milliseconds, so the expert store's copy thread and a server's
  // front end run beside it
  const auto kFree = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("rms_norm", &readmoe::rms_norm, "RMSNorm of rows [N, H]", kFree);
  m.def("rope_write_kv", &readmoe::rope_write_kv,
        "RoPE on q and k; k and v written to their pools", kFree);
  m.def("decode_attention", &readmoe::decode_attention,
        "one query per request over its paged KV", kFree);
  m.def("silu_mul", &readmoe::silu_mul, "silu(gate) * up of a fused gate|up product", kFree);
  m.def("panels_supported", &readmoe::panels_supported,
        "whether this CPU runs panel_linear (AVX-512F, or AVX2 and FMA)");
  m.def("avx512_panels", &readmoe::avx512_panels,
        "whether float32 panels multiply by the AVX-512 kernel here (else the AVX2 one)");
  m.def("bf16_panels_supported", &readmoe::bf16_panels_supported,
        "whether this CPU runs panel_linear on bf16 panels (AVX512-BF16, or AVX2 and FMA)");
  m.def("avx512_bf16_panels", &readmoe::avx512_bf16_panels,
        "whether bf16 panels multiply by AVX512-BF16 (and AMX) here, else by AVX2");
  m.def("panel_linear", &readmoe::panel_linear,
        "x @ W.T (+ bias) (+ add) through W's panels, into out if given", kFree);
  m.def("read_streams", &readmoe::read_streams,
        "a tensor's bytes read once in 1-16 streams a thread (a read-bandwidth probe)", kFree);
  m.def("argmax_rows", &readmoe::argmax_rows, "each row's first maximum, as torch.max", kFree);
  m.def("sticky_rows", &readmoe::sticky_rows,
        "experts from router logits with hysteresis, as pregating.sticky_argmax", kFree);
  m.def("swiglu", &readmoe::swiglu, "one SwiGLU expert on rows (+ add, into out)", kFree);
  m.def("decode_attention_block", &readmoe::decode_attention_block,
        "a decode-only step's attention block, residual added", kFree);
  m.def("moe_ffn", &readmoe::moe_ffn, "a layer's FFN: shared and routed experts, residual added",
        kFree);
  pybind11::class_<readmoe::Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, double, at::Tensor, at::Tensor, double>())
      .def("add_layer", &readmoe::Decoder::add_layer)
      .def("step", &readmoe::Decoder::step, kFree)
      .def_property_readonly("num_layers", &readmoe::Decoder::num_layers)
      .def_readwrite("team", &readmoe::Decoder::team)
      .def("team_runs", &readmoe::Decoder::team_runs)
      .def_readwrite("products_only", &readmoe::Decoder::products_only);
  pybind11::class_<readmoe::Router>(m, "Router")
      .def(pybind11::init<at::Tensor, int64_t, double, double, at::Tensor, at::Tensor,
                          at::Tensor, double, at::Tensor>())
      .def("add_block", &readmoe::Router::add_block)
      .def("step", &readmoe::Router::step, kFree);
  m.attr("BLOCKED_MIN_ROWS") = readmoe::kBlockedMinRows;
  m.def("panel_min_rows", &readmoe::panel_min_rows,
        "the fewest rows a product multiplies through float32 panels on this CPU");
  m.attr("BLOCKED_MAX_ROWS") = readmoe::kBlockedMaxRows;
  m.attr("PANEL_COLUMNS") = readmoe::kPanelColumns;
}
