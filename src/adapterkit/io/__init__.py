"""Adapter files (safetensors + JSON manifest) and Hugging Face PEFT interop."""

from .files import load_adapter, read_adapter, save_adapter
from .peft import export_peft_lora, load_peft_lora

__all__ = ["export_peft_lora", "load_adapter", "load_peft_lora", "read_adapter", "save_adapter"]
