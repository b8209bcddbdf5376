"""engine.cpu.kernels: vlbot's C kernels, each C source next to its Python wrapper.

| wrapper | C source | what it does |
|---|---|---|
| bf16_kernel.py | bf16_matvec.c | bf16 matrix-vector products of decode steps |
| int4_kernel.py | int4_matvec.c | 4-bit weights x 8-bit activations (every tier: quant_dot.h) |
| int8_kernel.py | int8_matvec.c | 8-bit weights x 8-bit activations (every tier: quant_dot.h) |
| output_head.py | int8_screen.c | the output head screened through an 8-bit copy |
| decode_ops.py | decode_ops.c | a decode step's RMSNorms and rotary embedding |
| decode_attention.py | decode_attention.c | a decode step's attention (bf16 or float32 cache) |
| decode_layer.py | decode_layer.c | a decode step's whole layer in two calls (bf16 weights) |
| prefill_ops.py | prefill_ops.c | a prompt's RMSNorms, q/k norm + rotary, SiLU gate (bf16, float32) |
| vision_attention.py | vision_rotary.c | the vision tower's rotary embedding |
| vision_flash.py | vision_flash.c | the vision tower's attention on AMX tiles (bf16) |
| vision_flash_portable.py | vision_flash_portable.c | the vision tower's attention elsewhere (AVX-512) |
| gelu.py | gelu_tanh.c | the vision MLP's tanh GELU (bf16) |

bf16.h, simd.h (vector floats for every tier, vf_exp, vf_fma, bf16 loads and stores) and quant_dot.h
are shared by the C sources. engine.cpu.native builds them (pyproject
ships *.c and *.h as package data). May import engine.cpu (native, hugepages, onednn_linear) and this
package.
"""
