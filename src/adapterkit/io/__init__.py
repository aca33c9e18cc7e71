"""Adapter files: our own (safetensors + JSON manifest), Hugging Face PEFT and AdapterHub.

Every reader ends in `install` (io/install.py): manifest + tensors -> an attached adapter.
"""

from .files import load, load_adapter, read_adapter, save, save_adapter
from .install import install, install_fusion
from .peft import export_peft_lora, load_peft_lora, read_peft_lora

__all__ = ["export_peft_lora", "install", "install_fusion", "load", "load_adapter", "load_peft_lora", "read_adapter",
           "read_peft_lora", "save", "save_adapter"]
