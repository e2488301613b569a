"""Hugging Face checkpoint -> GGUF structure, equivalent to llama.cpp's convert_hf_to_gguf.py
(llama-cpp-python 0.3.36): tensor names and order, q/k rope permutation, F32 tensors, hyper-parameter
and general.* metadata, tokenizer. Families: llama (Llama, Mistral, SmolLM2), mixtral, qwen2, qwen3,
qwen2moe, qwen3moe, gemma3 (text), gemma2, phi3.

    p = plan(model_dir)                       # GGUFPlan: arch, kv (file_type left open), tensors
    x = tensor_data(p.tensors[0], loader)     # float32 values of one GGUF tensor
    write_gguf(p, SafetensorsLoader(model_dir), "out.gguf", "BF16")
"""

from .architectures import UnsupportedModel
from .plan import OUTPUT_FILE_TYPES, GGUFPlan, plan
from .tensors import SafetensorsLoader, TensorSpec, tensor_data
from .tokenizer import UnknownPreTokenizer
from .writer import bf16_bits, encode_float, write_gguf

__all__ = ["plan", "GGUFPlan", "TensorSpec", "tensor_data", "write_gguf", "SafetensorsLoader",
           "OUTPUT_FILE_TYPES", "UnsupportedModel", "UnknownPreTokenizer", "bf16_bits", "encode_float",
           "convert"]


def convert(model_dir, out_path, out_type: str = "F16"):
    """plan + write_gguf for a local safetensors checkpoint."""
    p = plan(model_dir)
    loader = SafetensorsLoader(model_dir)
    try:
        return write_gguf(p, loader, out_path, out_type)
    finally:
        loader.close()
