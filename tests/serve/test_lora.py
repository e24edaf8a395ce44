"""The server serves a LoRA model as it is (adapters unmerged in the checkpoint) with the
same greedy answers as the merged model exported to llava-hf and run by `generate`."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image

from .conftest import LiveServer

NEW = 16


@pytest.fixture(scope="module")
def folders(llava_dir, tmp_path_factory):
    """(LoRA model folder: the tiny llava-hf model + a PEFT adapter with random non-zero
    B, imported by `import-hf --adapter`; its merged llava-hf export)."""
    peft = pytest.importorskip("peft", reason="needs peft (the test extra)")
    torch = pytest.importorskip("torch", reason="needs torch (the test extra)")
    from transformers import LlavaForConditionalGeneration

    from neva_jax.convert import __main__ as convert_cli

    torch.manual_seed(3)
    base = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init: make the adapters change the answers
                p.normal_(0.0, 0.3)
    root = tmp_path_factory.mktemp("serve_lora")
    model.save_pretrained(root / "adapter")
    lora_dir, merged = str(root / "lora"), str(root / "merged_hf")
    assert (
        convert_cli.main(["import-hf", llava_dir, lora_dir, "--adapter", str(root / "adapter")])
        == 0
    )
    assert convert_cli.main(["export-hf", lora_dir, merged]) == 0
    return lora_dir, merged


@pytest.fixture(scope="module")
def server(folders):
    from neva_jax.eval.generate import Generator

    generator = Generator.load(folders[0])
    assert generator.model.config.peft.scheme == "lora"  # served unmerged from the folder
    live = LiveServer(generator)
    yield live
    live.close()


def _generate(checkpoint, question, image, capsys):
    from neva_jax import generate as cli

    argv = ["--checkpoint", checkpoint, "--prompt", question, "--max-new-tokens", str(NEW)]
    assert cli.main([*argv, "--json", "--image", str(image)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]


def test_lora_served_equals_merged_generate(server, folders, llava_dir, tmp_path, capsys):
    question = "What colour are the shapes?"
    Image.new("RGB", (40, 30), (30, 200, 40)).save(tmp_path / "green.png")
    uri = (
        "data:image/png;base64," + base64.b64encode((tmp_path / "green.png").read_bytes()).decode()
    )
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    r = server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], max_tokens=NEW, temperature=0
    )
    served = r.choices[0].message.content
    assert served == _generate(folders[1], question, tmp_path / "green.png", capsys)
    assert served == _generate(folders[0], question, tmp_path / "green.png", capsys)
    # The adapters matter: the base model answers otherwise.
    assert served != _generate(llava_dir, question, tmp_path / "green.png", capsys)
