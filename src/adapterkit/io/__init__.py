"""Adapter files (safetensors + JSON manifest) and Hugging Face PEFT interop."""

from .files import load_adapter, read_adapter, save_adapter

__all__ = ["load_adapter", "read_adapter", "save_adapter"]
