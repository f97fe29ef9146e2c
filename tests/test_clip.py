"""minildm.clip against transformers' CLIPTextModel and CLIPTokenizer, on tiny random SD 1.5- and SD 2.1-shaped
text encoders that tests/sd_tiny.py builds locally (full depth: 12 and 23 layers; width 48 and 64; no download).

The tests that compare with transformers (or diffusers) skip with a reason when it is absent; the equations, the
causal mask and the errors of CLIPTextModel need torch only."""

import json
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sd_tiny import VARIANTS, text_encoder_config, tiny_vocab_and_merges, write_tiny_text_encoder, write_tiny_tokenizer

from minildm import LatentDiffusion, NoiseSchedule, UNet2DConditionModel, UNetConfig
from minildm.clip import CLIPTextConditioner, CLIPTextConfig, CLIPTextModel, quick_gelu, read_tokenizer_files
from minildm.interfaces import Conditioner, check_slot

SKIP_REASON = ("transformers is not installed (pip install -e '.[dev]'): the CLIP tests compare with its "
               "CLIPTextModel and use its CLIPTokenizer")
LONG_PROMPT = " ".join(["red circle"] * 40)  # 80 pieces: 75 fit between <|startoftext|> and <|endoftext|>


def transformers():
    return pytest.importorskip("transformers", reason=SKIP_REASON)


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def sd_folder(request, tmp_path_factory):
    """(variant, root folder with text_encoder/ and tokenizer/, the transformers model written there)."""
    transformers()
    root = tmp_path_factory.mktemp(request.param)
    reference = write_tiny_text_encoder(root / "text_encoder", request.param)
    write_tiny_tokenizer(root / "tokenizer", VARIANTS[request.param]["pad_token"])
    return request.param, root, reference


def random_ids(config, batch=3, seed=0):
    return torch.randint(0, config.vocab_size, (batch, config.max_position_embeddings),
                         generator=torch.Generator().manual_seed(seed))


# ---- the model, against transformers ----------------------------------------------------------------------------

def test_outputs_match_transformers(sd_folder):
    variant, root, reference = sd_folder
    model = CLIPTextModel.from_pretrained(root / "text_encoder")
    assert model.config.hidden_act == ("quick_gelu" if variant == "sd15" else "gelu")
    assert model.config.num_hidden_layers == (12 if variant == "sd15" else 23)
    ids = random_ids(model.config)
    ids[:, -1] = model.config.vocab_size - 1  # an <|endoftext|> in each row for the pooling
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        found = model(ids, output_hidden_states=True)
    assert found.last_hidden_state.shape == (3, 77, VARIANTS[variant]["hidden_size"])
    torch.testing.assert_close(found.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(found.pooler_output, expected.pooler_output, atol=1e-5, rtol=0)
    assert len(found.hidden_states) == len(expected.hidden_states) == model.config.num_hidden_layers + 1
    for mine, theirs in zip(found.hidden_states, expected.hidden_states):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_penultimate_layer_matches_transformers_and_differs_from_the_last(sd_folder):
    # diffusers' clip_skip rule (StableDiffusionPipeline.encode_prompt): hidden_states[-(clip_skip + 1)], then
    # final_layer_norm; computed here with transformers' own modules.
    _, root, reference = sd_folder
    conditioner = CLIPTextConditioner.from_pretrained(root, clip_skip=1)
    ids = random_ids(conditioner.text_encoder.config)
    with torch.no_grad():
        expected = reference.final_layer_norm(reference(ids, output_hidden_states=True).hidden_states[-2])
        found = conditioner(ids)
        last = reference(ids).last_hidden_state
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)
    assert (found - last).abs().max() > 0.1  # the comparison can tell the penultimate layer from the last


def test_penultimate_of_24_layers_is_the_last_of_diffusers_23(tmp_path):
    # SD 2.x reads the penultimate of OpenCLIP's 24 layers; diffusers' folders keep 23 of them. Both readings agree.
    transformers()
    write_tiny_text_encoder(tmp_path / "24", "sd21", num_hidden_layers=24)
    state = load_file(tmp_path / "24" / "model.safetensors")
    (tmp_path / "23").mkdir()
    save_file({k: v for k, v in state.items() if ".layers.23." not in k}, tmp_path / "23" / "model.safetensors")
    (tmp_path / "23" / "config.json").write_text(json.dumps(text_encoder_config("sd21")))
    write_tiny_tokenizer(tmp_path / "tokenizer", "!")
    files = read_tokenizer_files(tmp_path / "tokenizer")
    skip = CLIPTextConditioner(CLIPTextModel.from_pretrained(tmp_path / "24"), files, clip_skip=1)
    folder = CLIPTextConditioner(CLIPTextModel.from_pretrained(tmp_path / "23"), files)
    prompts = ["a photo of an astronaut riding a horse on mars", ""]
    torch.testing.assert_close(skip.encode(prompts), folder.encode(prompts), atol=1e-6, rtol=0)


def test_state_dict_names_are_transformers_4_names():
    # The names of a transformers CLIPTextModel built here (transformers 5 drops the text_model. prefix, which the
    # SD folders written by transformers 4 carry; its position_ids buffer is not saved) are minildm's, prefixed.
    tf = transformers()
    config = {k: v for k, v in text_encoder_config("sd15", num_hidden_layers=2).items()
              if k not in ("architectures", "dropout", "model_type", "torch_dtype", "transformers_version")}
    reference = tf.CLIPTextModel(tf.CLIPTextConfig(**config))
    theirs = {(k if k.startswith("text_model.") else f"text_model.{k}"): v.shape
              for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    model = CLIPTextModel(CLIPTextConfig.from_transformers(text_encoder_config("sd15", num_hidden_layers=2)))
    assert {k: v.shape for k, v in model.state_dict().items()} == theirs
    assert "text_model.encoder.layers.1.self_attn.q_proj.weight" in theirs


def test_both_key_layouts_load_the_same_weights(tmp_path):
    transformers()
    write_tiny_text_encoder(tmp_path / "legacy", "sd15", legacy_keys=True)
    write_tiny_text_encoder(tmp_path / "flat", "sd15", legacy_keys=False)
    assert "text_model.embeddings.position_ids" in load_file(tmp_path / "legacy" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in load_file(tmp_path / "flat" / "model.safetensors"))
    legacy, flat = (CLIPTextModel.from_pretrained(tmp_path / name) for name in ("legacy", "flat"))
    for (name, a), b in zip(legacy.state_dict().items(), flat.state_dict().values()):
        assert torch.equal(a, b), name


def test_transformers_reads_what_sd_tiny_writes(sd_folder):
    # The folders are what a later whole-pipeline test hands to diffusers: transformers must load them as written.
    tf = transformers()
    variant, root, reference = sd_folder
    loaded = tf.CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    ids = random_ids(CLIPTextConfig.from_transformers(text_encoder_config(variant)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, reference(ids).last_hidden_state, atol=0, rtol=0)


# ---- the equations, without transformers ------------------------------------------------------------------------

def test_quick_gelu_is_the_sigmoid_approximation_of_gelu():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    expected = x / (1 + torch.exp(-1.702 * x))  # x·σ(1.702x), σ written out
    torch.testing.assert_close(quick_gelu(x), expected)
    assert (quick_gelu(x) - F.gelu(x)).abs().max() < 0.03  # close to the exact GELU it approximates ...
    assert (quick_gelu(x) - F.gelu(x)).abs().max() > 0.01  # ... and not the same function


def tiny_model(hidden_act="quick_gelu", layers=2, seed=0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=12, hidden_act=hidden_act)
    return CLIPTextModel(config).eval()


def test_attention_is_causal():
    model = tiny_model()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).last_hidden_state, model(changed).last_hidden_state
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)  # positions before 7 never see it
    assert ((a[0, 7:] - b[0, 7:]).abs().amax(dim=-1) > 1e-4).all()  # position 7 and every later one do


def test_one_layer_written_out_by_hand():
    # softmax(QK^T/sqrt(d) + M)V with M = -inf above the diagonal, in a pre-LN layer, against the module.
    model = tiny_model(hidden_act="gelu", layers=1)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    body, layer = model.text_model, model.text_model.encoder.layers[0]
    x = body.embeddings.token_embedding.weight[ids] + body.embeddings.position_embedding.weight[:12]
    h = F.layer_norm(x, (16,), layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-5)
    q, k, v = (F.linear(h, p.weight, p.bias).view(2, 12, 4, 4).transpose(1, 2)
               for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
    mask = torch.full((12, 12), float("-inf")).triu(1)
    attention = ((q @ k.transpose(-1, -2)) / 2 + mask).softmax(-1) @ v  # sqrt(d) = sqrt(4) = 2
    x = x + F.linear(attention.transpose(1, 2).reshape(2, 12, 16), layer.self_attn.out_proj.weight,
                     layer.self_attn.out_proj.bias)
    h = F.layer_norm(x, (16,), layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-5)
    x = x + layer.mlp.fc2(F.gelu(layer.mlp.fc1(h)))
    expected = F.layer_norm(x, (16,), body.final_layer_norm.weight, body.final_layer_norm.bias, 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, expected.detach(), atol=1e-5, rtol=0)


def test_pooler_output_at_end_of_text():
    model = tiny_model()
    ids = torch.tensor([[3, 5, 49, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 2])  # eos_token_id 2: the highest id
    model.config.eos_token_id = 5  # transformers' rule since PR #24773: the first eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(ids).pooler_output, out.last_hidden_state[:, 1])


def test_presets_count_the_real_parameters():
    # 123.06M for CLIP ViT-L/14's text tower; 23 layers of OpenCLIP ViT-H/14's: 340.4M (meta device: no memory)
    with torch.device("meta"):
        sd15 = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig.sd15()).parameters())
        sd21 = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig.sd21()).parameters())
    assert sd15 == 123_060_480
    assert sd21 == 340_387_840


def test_bad_input_ids():
    model = tiny_model()
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 12))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="from 0 to 49"):
        model(torch.full((1, 12), 50))


def test_bad_configs():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="divide"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="CLIPTextModel"):
        CLIPTextConfig.from_transformers({**text_encoder_config("sd15"), "model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="CLIPTextModel"):
        CLIPTextConfig.from_transformers({**text_encoder_config("sd15"),
                                          "architectures": ["CLIPTextModelWithProjection"]})
    with pytest.raises(ValueError, match="lacks hidden_size"):
        CLIPTextConfig.from_transformers({k: v for k, v in text_encoder_config("sd15").items() if k != "hidden_size"})


# ---- loading: dtypes and bad folders ----------------------------------------------------------------------------

def test_torch_dtype_and_fp16_variant(tmp_path):
    transformers()
    reference = write_tiny_text_encoder(tmp_path, "sd15")
    half = CLIPTextModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in half.parameters()) and not half.training
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              tmp_path / "model.fp16.safetensors")
    fp16 = CLIPTextModel.from_pretrained(tmp_path, variant="fp16")  # keeps the file's dtype
    assert {p.dtype for p in fp16.parameters()} == {torch.float16}
    ids = random_ids(fp16.config, 1)
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
        upcast = CLIPTextModel.from_pretrained(tmp_path, torch_dtype=torch.float32, variant="fp16")
        found = upcast(ids).last_hidden_state
    torch.testing.assert_close(found, expected, atol=0.05, rtol=0)  # fp16 weights: ~1e-3 apart
    with pytest.raises(TypeError, match="torch_dtype"):
        CLIPTextModel.from_pretrained(tmp_path, torch_dtype="half")


def test_bad_text_encoder_folders(tmp_path):
    transformers()
    good = tmp_path / "good"
    write_tiny_text_encoder(good, "sd15", num_hidden_layers=2)

    def variant_of_good(name):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    with pytest.raises(FileNotFoundError, match="no text encoder folder"):
        CLIPTextModel.from_pretrained(tmp_path / "absent")
    no_config = variant_of_good("no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CLIPTextModel.from_pretrained(no_config)
    no_weights = variant_of_good("no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        CLIPTextModel.from_pretrained(no_weights)
    pickle_only = variant_of_good("pickle_only")
    (pickle_only / "model.safetensors").rename(pickle_only / "pytorch_model.bin")  # never opened, whatever it holds
    with pytest.raises(ValueError, match="only pickled weights .pytorch_model.bin.*never loads"):
        CLIPTextModel.from_pretrained(pickle_only)
    wrong_shape = variant_of_good("wrong_shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"fc1.weight: expected shape \(96, 48\), found \(192, 48\)"):
        CLIPTextModel.from_pretrained(wrong_shape)
    too_deep = variant_of_good("too_deep")
    (too_deep / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing tensors: text_model.encoder.layers.2"):
        CLIPTextModel.from_pretrained(too_deep)
    bad_json = variant_of_good("bad_json")
    (bad_json / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        CLIPTextModel.from_pretrained(bad_json)
    state = load_file(good / "model.safetensors")
    moved = variant_of_good("moved_positions")
    save_file({**state, "text_model.embeddings.position_ids": torch.arange(77).flip(0)[None]},
              moved / "model.safetensors")
    with pytest.raises(ValueError, match="position_ids must be 0, 1, ..., 76"):
        CLIPTextModel.from_pretrained(moved)
    mixed = variant_of_good("mixed")
    save_file({k.removeprefix("text_model.") if "final_layer_norm" in k else k: v for k, v in state.items()},
              mixed / "model.safetensors")
    with pytest.raises(ValueError, match="mixes names"):
        CLIPTextModel.from_pretrained(mixed)
    mixed_dtypes = variant_of_good("mixed_dtypes")
    save_file({k: v.half() if "final_layer_norm" in k else v for k, v in state.items()},
              mixed_dtypes / "model.safetensors")
    with pytest.raises(ValueError, match="mixes floating-point dtypes"):
        CLIPTextModel.from_pretrained(mixed_dtypes)


# ---- the tokenizer ----------------------------------------------------------------------------------------------

def test_tiny_vocabulary_is_clip_shaped():
    vocab, merges = tiny_vocab_and_merges()
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # the byte symbols, then the same ending a word, as CLIP's
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert "c a" in merges and "ca t</w>" in merges


def test_ids_and_padding_as_the_sd_folders_specify(sd_folder):
    tf = transformers()
    variant, root, _ = sd_folder
    conditioner = CLIPTextConditioner.from_pretrained(root)
    vocab, _ = tiny_vocab_and_merges()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    pad = eos if variant == "sd15" else vocab["!"]  # SD 1.x pads with <|endoftext|>, SD 2.x with "!" (id 0)
    ids = conditioner.input_ids(["a photo of a cat", ""])
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "a", "cat")]
    assert ids[0].tolist() == [bos, *words, eos] + [pad] * 70
    assert ids[1].tolist() == [bos, eos] + [pad] * 75
    # the same ids as transformers' CLIPTokenizer loaded from the folder, called as diffusers calls it
    tokenizer = tf.CLIPTokenizer.from_pretrained(root / "tokenizer")
    prompts = ["A Photo of a CAT,  riding!", "ünïcode émoji 🐱 and 3.14", LONG_PROMPT, "circles squares"]
    expected = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(conditioner.input_ids(prompts), expected)


def test_encode_matches_diffusers_encode_prompt(sd_folder):
    # diffusers' StableDiffusionPipeline.encode_prompt on the same folders (its text side only: no UNet or VAE),
    # for the prompt and the unconditional "" of classifier-free guidance.
    tf = transformers()
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[dev]')")
    _, root, _ = sd_folder
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, unet=None, text_encoder=tf.CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=tf.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    prompts = ["a photo of an astronaut riding a horse on mars", LONG_PROMPT]
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    conditioner = CLIPTextConditioner.from_pretrained(root)
    with torch.no_grad():
        torch.testing.assert_close(conditioner.encode(prompts), cond, atol=1e-5, rtol=0)
        torch.testing.assert_close(conditioner.encode([conditioner.null_condition] * 2), uncond, atol=1e-5, rtol=0)


def test_tokens_label_each_position(sd_folder):
    _, root, _ = sd_folder
    conditioner = CLIPTextConditioner.from_pretrained(root)
    assert conditioner.tokens("a photo of a Cat, riding") == \
        ["<|startoftext|>", "a", "photo", "of", "a", "cat", ",", "riding", "<|endoftext|>"]
    assert conditioner.tokens("circles") == ["<|startoftext|>", "circl", "e", "s", "<|endoftext|>"]  # pieces
    assert len(conditioner.tokens(LONG_PROMPT)) == 77
    assert conditioner.tokens("") == ["<|startoftext|>", "<|endoftext|>"]


def test_words_past_the_limit_are_named(sd_folder):
    _, root, _ = sd_folder
    conditioner = CLIPTextConditioner.from_pretrained(root)
    assert conditioner.ignored_words("a photo of a cat") == {}
    assert conditioner.ignored_words(" ".join(["red"] * 75)) == {}  # exactly 75 pieces fit
    assert conditioner.ignored_words(LONG_PROMPT) == \
        {"past the 77-token limit": ["circle", "red", "circle", "red", "circle"]}  # pieces 75 to 79
    # a word the cut splits ("circles": circl|e|s, its first piece the 75th) is named whole
    assert conditioner.ignored_words(" ".join(["red"] * 74) + " circles cat") == \
        {"past the 77-token limit": ["circles", "cat"]}


def test_bad_tokenizer_folders(tmp_path, sd_folder):
    _, root, _ = sd_folder
    no_merges = shutil.copytree(root / "tokenizer", tmp_path / "no_merges")
    (no_merges / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="missing merges.txt"):
        read_tokenizer_files(no_merges)
    other = shutil.copytree(root / "tokenizer", tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(ValueError, match="T5Tokenizer"):
        read_tokenizer_files(other)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    longer = read_tokenizer_files(root / "tokenizer")
    longer["tokenizer_config.json"] = json.dumps({**config, "model_max_length": 64})
    with pytest.raises(ValueError, match="model_max_length=64"):
        CLIPTextConditioner(text_encoder, longer)
    small_vocab = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)  # 50 < the tokenizer's 592 tokens
    with pytest.raises(ValueError, match="vocab_size"):
        CLIPTextConditioner(CLIPTextModel(small_vocab), read_tokenizer_files(root / "tokenizer"))
    with pytest.raises(ValueError, match="clip_skip"):
        CLIPTextConditioner(text_encoder, read_tokenizer_files(root / "tokenizer"),
                            clip_skip=text_encoder.config.num_hidden_layers)
    text_only = tmp_path / "text_only"
    shutil.copytree(root / "text_encoder", text_only / "text_encoder")
    with pytest.raises(FileNotFoundError, match="no tokenizer/ folder"):
        CLIPTextConditioner.from_pretrained(text_only)
    with pytest.raises(TypeError, match="prompts"):
        CLIPTextConditioner.from_pretrained(root).encode([1, 2])


def test_without_transformers_the_conditioner_says_what_to_install(monkeypatch, tmp_path):
    write_tiny_tokenizer(tmp_path)  # plain files: no transformers needed to write or read them
    files = read_tokenizer_files(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match="pip install transformers"):
        CLIPTextConditioner(tiny_model(), files)


# ---- the conditioner slot ---------------------------------------------------------------------------------------

def clip_ldm(root, variant) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 16),
                                           attention_levels=(False, True), norm_num_groups=4, attention_head_dim=8,
                                           cross_attention_dim=VARIANTS[variant]["hidden_size"]))
    return LatentDiffusion(None, unet, NoiseSchedule(), CLIPTextConditioner.from_pretrained(root), image_size=8).eval()


def test_fills_the_conditioner_slot_train_generate_save_load(sd_folder, tmp_path):
    variant, root, _ = sd_folder
    model = clip_ldm(root, variant)
    check_slot(model.conditioner, Conditioner, "conditioner")
    assert model.conditioner.encode(["a cat", ""]).shape == (2, 77, VARIANTS[variant]["hidden_size"])
    # training reaches the UNet; the frozen CLIP encoder gets no gradient
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = model.training_loss(images, ["a cat", "a dog"], generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in model.conditioner.parameters())
    with pytest.warns(UserWarning, match=r"past the 77-token limit: 'circle', 'red'\)"):
        images = model.generate([LONG_PROMPT], 2, generator=torch.Generator().manual_seed(0))
    model.save(tmp_path / "ldm")
    config = json.loads((tmp_path / "ldm" / "config.json").read_text())
    assert config["conditioner"]["class"] == "CLIPTextConditioner"
    loaded = LatentDiffusion.load(tmp_path / "ldm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = loaded.generate([LONG_PROMPT], 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, images, atol=0, rtol=0)
    prompts = ["a photo of a cat", "", LONG_PROMPT]
    assert torch.equal(loaded.conditioner.input_ids(prompts), model.conditioner.input_ids(prompts))
    torch.testing.assert_close(loaded.conditioner.encode(prompts), model.conditioner.encode(prompts), atol=0, rtol=0)


def test_clip_skip_is_saved_only_when_set(sd_folder):
    _, root, _ = sd_folder
    plain = CLIPTextConditioner.from_pretrained(root)
    assert "clip_skip" not in plain.config_dict()
    skip = CLIPTextConditioner.from_pretrained(root, clip_skip=2)
    rebuilt = CLIPTextConditioner.from_config_dict(json.loads(json.dumps(skip.config_dict())))
    assert rebuilt.clip_skip == 2
    rebuilt.load_state_dict(skip.state_dict())
    torch.testing.assert_close(rebuilt.encode("a cat"), skip.encode("a cat"), atol=0, rtol=0)
