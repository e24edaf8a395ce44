"""Export to a `transformers` llava-hf folder: round trip, processor, chat template, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from neva_jax.convert import __main__ as convert_cli
from neva_jax.convert import checkpoint, hf, hf_chat, hf_export

IMAGE_ID, PAD_ID, EOS_ID = 4, 3, 2  # the synthetic tokenizer's <image>, <pad>, </s>


def _build_llava_hf(out: str, *, projector_act: str) -> None:
    """A tiny random LlavaForConditionalGeneration folder with the synthetic tokenizer."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from neva_jax.data import synth

    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        pad_token_id=PAD_ID,
        image_seq_length=16,
        projector_hidden_act=projector_act,
    )
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    synth.build_tokenizer(out)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = torch.tensor(
        [[1, *[IMAGE_ID] * 16, 10, 20, 30, 40], [1, *[IMAGE_ID] * 16, 50, 60, 70, 80]]
    )
    return ids, torch.from_numpy(rng.normal(size=(2, 3, 32, 32)).astype(np.float32))


@pytest.mark.parametrize("projector_act", ["gelu", "linear"])  # mlp2x_gelu and linear projectors
def test_round_trip_logits(tmp_path, projector_act):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src, folder, out = tmp_path / "hf", tmp_path / "model", tmp_path / "export"
    _build_llava_hf(str(src), projector_act=projector_act)
    imported = hf.import_llava(src)
    checkpoint.save_model(folder, imported.model, tokenizer=imported.tokenizer)
    hf_export.export_hf(folder, out)

    original = LlavaForConditionalGeneration.from_pretrained(src).eval()
    reloaded = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    ids, pixels = _inputs()
    with torch.no_grad():
        want = original(input_ids=ids, pixel_values=pixels).logits
        got = reloaded(input_ids=ids, pixel_values=pixels).logits
    assert (got - want).abs().max().item() <= 1e-5
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(processor).__name__ == "LlavaProcessor"
    assert (out / "preprocessor_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_index"] == IMAGE_ID
    assert config["projector_hidden_act"] == projector_act


def test_processor_matches_our_prompt_and_pixels(tmp_path):
    """The exported processor renders the prompt and the pixels like `neva_jax.generate`."""
    from PIL import Image
    from transformers import AutoProcessor

    from neva_jax.data.conversation import get_template
    from neva_jax.data.tokenize import load_tokenizer
    from neva_jax.eval.generate import Generator

    src, folder, out = tmp_path / "hf", tmp_path / "model", tmp_path / "export"
    _build_llava_hf(str(src), projector_act="gelu")
    imported = hf.import_llava(src)
    checkpoint.save_model(folder, imported.model, tokenizer=imported.tokenizer)
    assert convert_cli.main(["export-hf", str(folder), str(out)]) == 0
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    gen = Generator(
        imported.model,
        load_tokenizer(str(src), control_tokens=("</s>",)),
        get_template("vicuna_v1"),
    )
    question = "What colour are the shapes?"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt, ids = gen.prompt_ids(question, has_image=True)
    assert text == prompt
    rng = np.random.default_rng(1)
    image = Image.fromarray((rng.uniform(size=(40, 56, 3)) * 255).astype(np.uint8))
    inputs = processor(images=image, text=text, return_tensors="np")
    # Same image slots. (The ids around `<image>` may differ in whitespace tokens:
    # the processor tokenizes the whole prompt, LLaVA and neva-jax each text chunk.)
    assert inputs["input_ids"][0].tolist().count(IMAGE_ID) == ids.count(IMAGE_ID) == 16
    pixels = inputs["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(pixels, gen.preprocess(image), atol=1e-5)


def test_conversation_travels_with_the_model_folder(tmp_path, capsys):
    """A model folder's conversation.json (template, image aspect mode) is what generate
    defaults to; export-hf writes the template as the chat template and import-hf
    reads it back; the import flags win; a bad file fails naming itself."""
    from neva_jax.eval.generate import Generator

    src, folder, export = tmp_path / "hf", tmp_path / "model", tmp_path / "export"
    _build_llava_hf(str(src), projector_act="gelu")
    imported = hf.import_llava(src)
    assert imported.template is None  # no chat template in the folder
    checkpoint.save_model(
        folder,
        imported.model,
        tokenizer=imported.tokenizer,
        template="llava_llama_2",
        image_aspect_ratio="pad",
    )
    conversation = {"template": "llava_llama_2", "image_aspect_ratio": "pad"}
    assert json.loads((folder / "conversation.json").read_text()) == conversation
    # The tokenizer may also be given as a folder or as the Generator's TextTokenizer.
    gen = Generator.load(str(folder))
    for name, tokenizer in (("by_path", folder / "tokenizer"), ("by_text", gen.tokenizer)):
        checkpoint.save_model(tmp_path / name, imported.model, tokenizer=tokenizer)
        assert (tmp_path / name / "tokenizer" / "tokenizer_config.json").exists()
    with pytest.raises(TypeError, match="expected a transformers tokenizer"):
        checkpoint.save_model(tmp_path / "bad", imported.model, tokenizer=object())
    assert not (tmp_path / ".bad.partial").exists() and not (tmp_path / "bad").exists()
    gen = Generator.load(str(folder))
    assert (gen.template.name, gen.image_aspect) == ("llava_llama_2", "pad")
    assert Generator.load(str(folder), template="nvgpt").template.name == "nvgpt"

    capsys.readouterr()
    assert convert_cli.main(["export-hf", str(folder), str(export)]) == 0
    # llava-hf's processor centre-crops: the pad the model was trained with is not kept
    assert "trained with image_aspect_ratio='pad'; llava-hf's" in capsys.readouterr().err
    assert convert_cli.main(["import-hf", str(export), str(tmp_path / "back")]) == 0
    assert "template llava_llama_2 (" in capsys.readouterr().out
    _, info = checkpoint.load_model(tmp_path / "back")
    assert (info.template, info.image_aspect_ratio) == ("llava_llama_2", None)
    _, info = checkpoint.load_model(export)  # a llava-hf folder read directly
    assert info.template == "llava_llama_2"
    flags = ["--template", "vicuna_v1", "--image-aspect", "keep"]
    assert convert_cli.main(["import-hf", str(export), str(tmp_path / "flags"), *flags]) == 0
    _, info = checkpoint.load_model(tmp_path / "flags")
    assert (info.template, info.image_aspect_ratio) == ("vicuna_v1", "keep")
    # A chat template we did not generate (llava-hf's own, say) names no template.
    llava_hf = "{% for m in messages %}USER: {{ m['content'] }} ASSISTANT:{% endfor %}"
    assert hf_chat.template_of_chat_template(llava_hf) is None
    assert convert_cli.main(["import-hf", str(src), str(tmp_path / "plain")]) == 0
    assert "template not named" in capsys.readouterr().out
    assert not (tmp_path / "plain" / "conversation.json").exists()

    (folder / "conversation.json").write_text('{"template": "vicuna"}')
    with pytest.raises(ValueError, match=r"conversation.json: template 'vicuna': unknown"):
        checkpoint.load_model(folder)
    (folder / "conversation.json").write_text('{"template": "vicuna_v1",}')
    with pytest.raises(ValueError, match=r"conversation.json: not JSON"):
        checkpoint.load_model(folder)


def test_checkpoint_kind_judges_a_folder_by_what_it_holds(tmp_path):
    """A model folder or llava-hf folder named like a step (`2024/`) is what it holds; each
    other case gets its own one-line reason."""
    model = tmp_path / "2024"
    (model / checkpoint.PARAMS).mkdir(parents=True)
    (model / checkpoint.MODEL_CONFIG).write_text("{}")
    assert checkpoint.checkpoint_kind(model) == "model_folder"
    llava = tmp_path / "1000"
    llava.mkdir()
    (llava / "config.json").write_text('{"model_type": "llava"}')
    assert checkpoint.checkpoint_kind(llava) == "llava_hf"
    cases = {
        tmp_path / "absent": "no such file or folder",
        tmp_path / "run": "a training run with no complete checkpoint yet",
        tmp_path / "run" / checkpoint.CHECKPOINT_DIR / "5": "checkpoint step folder is incomplete",
        tmp_path / "broken": "config.json: not a readable config.json",
        tmp_path / "other": "not a training workdir or step folder",
    }
    (tmp_path / "run" / checkpoint.CHECKPOINT_DIR / "5" / "state").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{nope")
    (tmp_path / "other").mkdir()
    for path, reason in cases.items():
        with pytest.raises(FileNotFoundError, match=reason):
            checkpoint.checkpoint_kind(path)


def test_export_refuses_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_export.export_hf(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ValueError, match=r"--tokenizer .*: not a folder"):
        hf_export.export_hf(tmp_path / "nothing", tmp_path / "new", tokenizer=tmp_path / "x")
    (tmp_path / "empty").mkdir()  # was transformers' "Couldn't instantiate the backend..."
    with pytest.raises(ValueError, match=r"--tokenizer .*empty: no tokenizer files in it"):
        hf_export.export_hf(tmp_path / "nothing", tmp_path / "new", tokenizer=tmp_path / "empty")
    argv = ["export-hf", str(tmp_path / "nothing"), str(tmp_path / "new"), "--adapter-only"]
    assert convert_cli.main([*argv, "--template", "vicuna_v1"]) == 1  # PEFT's folder has none


def test_chat_templates_render_like_ours():
    """The generated Jinja renders every template exactly as `Template.render`."""
    import jinja2

    from neva_jax.data.conversation import TEMPLATES, Message

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    hf_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    ours = [
        Message("user", "<image>\nWhat is it?"),
        Message("assistant", "A cat."),
        Message("user", "Sure?"),
    ]
    for name, template in TEMPLATES.items():
        jinja = env.from_string(hf_chat.chat_template(template))
        want = "".join(s.text for s in template.render(ours))
        assert jinja.render(messages=hf_messages) == want, name
        no_system = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
        want = "".join(s.text for s in template.render([Message("user", "hi")], system=""))
        assert jinja.render(messages=no_system) == want, name


def test_sharded_weights_and_index(tmp_path):
    tensors = iter(
        [("a", np.ones((4, 4), np.float32)), ("b", np.zeros((8,), np.float32)), ("c", np.ones(3))]
    )
    total = hf_export.write_weights(tmp_path, tensors, np.float32, max_shard_bytes=64)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert total == 64 + 32 + 12
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    from safetensors.numpy import load_file

    assert load_file(tmp_path / "model-00002-of-00002.safetensors")["c"].tolist() == [1, 1, 1]


def test_model_trained_by_main_exports_and_reloads(tmp_path):
    """A workdir written by `python -m neva_jax.main` exports; transformers reproduces our logits."""
    import subprocess
    import sys

    import jax.numpy as jnp
    from transformers import LlavaForConditionalGeneration

    from neva_jax.data import synth

    data, workdir, out = tmp_path / "data", tmp_path / "run", tmp_path / "export"
    synth.generate(str(data), n_train=16, n_eval=2, image_size=32)
    cmd = [
        sys.executable,
        "-m",
        "neva_jax.main",
        f"--config=configs/tiny.py:stage2,data_dir={data}",
    ]
    cmd += [f"--workdir={workdir}", "--config.train.steps=2", "--config.train.batch_size=8"]
    cmd += ["--config.eval.steps=1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    ours, _ = checkpoint.load_model(workdir)
    hf_export.export_hf(workdir, out)
    reloaded = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    ids, pixels = _inputs()
    ids[ids == IMAGE_ID] = ours.config.image_token_id
    with torch.no_grad():
        got = reloaded(input_ids=ids, pixel_values=pixels).logits.numpy()
    want = np.asarray(
        ours(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1))[:, None])
    )
    # Two implementations: the parity bound of docs/DESIGN.md "Testing".
    assert np.abs(got - want).max() <= 1e-4
