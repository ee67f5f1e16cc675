"""ChatGLM2/ChatGLM3 loading, conversion and backbone against the outputs of the original remote code.

The goldens come from 2-layer, hidden-64 models with random weights (4 heads, 2 key/value groups of 16
channels) run through the original `modeling_chatglm.py` of each model in fp32 on CPU. The models here are
transformers' `GlmForCausalLM` after key conversion. Tolerances: logits and keys/values 1e-4 (values are
O(10)), loss 1e-5, prefix keys and values 1e-6, token ids exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from helpers_chatglm import greedy_generate, load_json, shared_dir
from ptuning_pl.backbones import chatglm2
from ptuning_pl.backbones.chatglm2 import (
    ChatGLM2Backbone,
    ChatGLM2CheckpointMismatchError,
    glm_config_from_chatglm,
    import_reference_prefix,
    load_chatglm2_backbone,
    load_chatglm2_tokenizer_and_format,
    save_converted,
)
from ptuning_pl.backbones.hf import load_hf_backbone
from ptuning_pl.generation import GenerationSettings, generate
from ptuning_pl.prefix import PrefixEncoder

LOGITS_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
PREFIX_TOLERANCE = 1e-6
PRE_SEQ_LEN = 4
VERSIONS = ("v2", "v3")
# Stop ids of the tiny models' generation goldens: eos, and for ChatGLM3 also <|user|> and <|observation|>.
STOP_IDS = {"v2": [2], "v3": [2, 1006, 1008]}
TINY_PAD_ID = 0

# Golden group name -> (prefix file, prefix_projection); None means the base model without a prefix.
VARIANTS = {
    "base": None,
    "prefix": ("prefix_encoder.safetensors", False),
    "prefix_proj": ("prefix_encoder_proj.safetensors", True),
}
FORWARD_GROUP = {"base": "fwd", "prefix": "fwd_prefix", "prefix_proj": "fwd_prefix_proj"}
GENERATION_GROUP = {"base": "gen", "prefix": "gen_prefix", "prefix_proj": "gen_prefix_proj"}
PREFIX_KV_GROUP = {"prefix": "prefix_kv", "prefix_proj": "prefix_kv_proj"}


def fixture_dir(version: str) -> Path:
    folder = shared_dir() / "fixtures" / version
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"ChatGLM2/ChatGLM3 golden fixtures not found in {folder}; set PTUNING_SHARED_DIR")
    return folder


@pytest.fixture(scope="module", params=VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def goldens(version) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(fixture_dir(version) / "goldens.safetensors"))


@pytest.fixture(scope="module")
def backbone(version) -> ChatGLM2Backbone:
    return load_chatglm2_backbone(fixture_dir(version))


def make_prefix_encoder(version: str, backbone: ChatGLM2Backbone, variant: str) -> PrefixEncoder | None:
    if VARIANTS[variant] is None:
        return None
    file_name, projection = VARIANTS[variant]
    encoder = PrefixEncoder(PRE_SEQ_LEN, backbone.geometry, prefix_projection=projection, family="chatglm2")
    encoder.load_state_dict(import_reference_prefix(fixture_dir(version) / file_name))
    return encoder.eval()


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over labels != -100 after the shift by one, as the original forward computes it."""
    targets = labels[:, 1:]
    supervised = targets != -100
    return F.cross_entropy(logits[:, :-1][supervised], targets[supervised])


def train_forward(backbone, goldens, prefix):
    cache = backbone.new_cache(prefix, goldens["train.input_ids"].shape[0])
    logits = backbone.forward(goldens["train.input_ids"], goldens["train.attention_mask"], cache)
    return logits, cache


# ---------------------------------------------------------------------------------------------- goldens


def test_geometry_sizes_prefix_by_groups(backbone, version):
    geometry = backbone.geometry
    assert (geometry.num_layers, geometry.kv_heads, geometry.head_dim, geometry.hidden_size) == (2, 2, 16, 64)
    assert backbone.prefix_family == "chatglm2"
    shapes = load_json(fixture_dir(version) / "manifest.json")["prefix"]["keys_prefix_projection_true"]
    encoder = PrefixEncoder(PRE_SEQ_LEN, geometry, prefix_projection=True, family="chatglm2")
    ours = {
        f"transformer.prefix_encoder.{name}": list(value.shape)
        for name, value in encoder.state_dict().items()
    }
    assert ours == shapes


def test_rotary_embedding_matches_original(backbone, goldens):
    rotary = backbone.model.model.rotary_emb
    # The original keeps an fp16-rounded copy of the frequencies but recomputes them in fp32 in forward.
    assert torch.equal(rotary.inv_freq.half().float(), goldens["rotary_inv_freq"])

    positions = goldens["train.position_ids"]
    cos, sin = rotary(torch.zeros(1), positions)
    # The original's (seq, batch, rotary_dim / 2, [cos, sin]); ours repeat the frequencies: (batch, seq, dim).
    expected = goldens["fwd.layer0_rotary_pos_emb"].permute(1, 0, 2, 3)
    half = expected.shape[2]
    torch.testing.assert_close(cos[..., :half], expected[..., 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[..., :half], expected[..., 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_original(backbone, goldens, version, variant):
    group = FORWARD_GROUP[variant]
    encoder = make_prefix_encoder(version, backbone, variant)
    prefix = encoder(2) if encoder is not None else None
    with torch.no_grad():
        logits, cache = train_forward(backbone, goldens, prefix)

    # Only real tokens are compared: the original lets padding rows attend to every column.
    real = goldens["train.attention_mask"].bool()
    assert (logits[real] - goldens[f"{group}.logits"][real]).abs().max() < LOGITS_TOLERANCE
    loss = shifted_loss(logits, goldens["train.labels"])
    assert abs(loss.item() - goldens[f"{group}.loss"].item()) < LOSS_TOLERANCE

    # The original's cache is (seq, batch, groups, head_dim), prefix first; ours is (batch, groups, seq, dim).
    layer = cache.cache.layers[0]
    expected_keys = goldens[f"{group}.present_key_layer0"].permute(1, 2, 0, 3)
    expected_values = goldens[f"{group}.present_value_layer0"].permute(1, 2, 0, 3)
    assert (layer.keys - expected_keys).abs().max() < LOGITS_TOLERANCE
    assert (layer.values - expected_values).abs().max() < LOGITS_TOLERANCE


@pytest.mark.parametrize("variant", ["prefix", "prefix_proj"])
def test_prefix_key_values_match_original(backbone, goldens, version, variant):
    encoder = make_prefix_encoder(version, backbone, variant)
    with torch.no_grad():
        prefix = encoder(2)
    for layer_index, (keys, values) in enumerate(prefix):
        # The original's (2, pre_seq_len, batch, groups, head_dim) -> ours (batch, groups, pre_seq_len, dim).
        expected = goldens[f"{PREFIX_KV_GROUP[variant]}.layer{layer_index}"].permute(0, 2, 3, 1, 4)
        assert (keys - expected[0]).abs().max() < PREFIX_TOLERANCE
        assert (values - expected[1]).abs().max() < PREFIX_TOLERANCE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_original(backbone, goldens, version, variant):
    group = GENERATION_GROUP[variant]
    encoder = make_prefix_encoder(version, backbone, variant)
    input_ids = goldens[f"{group}.input.input_ids"]
    attention_mask = goldens[f"{group}.input.attention_mask"]
    expected_tokens = goldens[f"{group}.new_tokens"]

    # Positions: ours come from the padding mask and must equal those the original tokenizer built.
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(positions, goldens[f"{group}.input.position_ids"])

    def prefix_kv(batch_size):
        return encoder(batch_size) if encoder is not None else None

    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
    settings = GenerationSettings(max_new_tokens=expected_tokens.shape[1])
    generated = generate(backbone, prefix_kv, prompts, TINY_PAD_ID, STOP_IDS[version], settings)
    for row, tokens in enumerate(generated):
        expected = expected_tokens[row].tolist()
        stops = [step for step, token in enumerate(expected) if token in STOP_IDS[version]]
        # generate() returns the tokens before the stop token; the original writes the stop, then pads.
        expected = expected[: stops[0]] if stops else expected
        assert tokens == expected, f"row {row}"

    # Every step's logits, fed with the original's tokens (the stop token itself is fed like any other).
    with torch.no_grad():
        tokens, scores = greedy_generate(
            backbone, input_ids, attention_mask, prefix_kv(2), expected_tokens.shape[1]
        )
    sequences = goldens[f"{group}.sequences"]
    assert torch.equal(sequences[:, : input_ids.shape[1]], input_ids)
    for row in range(2):
        steps = expected_tokens.shape[1]
        stops = [step for step in range(steps) if expected_tokens[row, step] in STOP_IDS[version]]
        # After the stop the original feeds padding, so only the steps up to the stop are compared.
        last = stops[0] + 1 if stops else steps
        assert torch.equal(tokens[row, :last], expected_tokens[row, :last]), f"row {row}"
        difference = (scores[:last, row] - goldens[f"{group}.scores"][:last, row]).abs().max()
        assert difference < LOGITS_TOLERANCE, f"row {row}"


# ------------------------------------------------------------------------------------------- loading


def test_converted_folder_loads_as_transformers_model(tmp_path, backbone, goldens, version):
    target = save_converted(fixture_dir(version), tmp_path / "converted")
    names = sorted(path.name for path in target.iterdir())
    assert names == ["chatglm_conversion.json", "config.json", "generation_config.json", "model.safetensors"]
    record = load_json(target / "chatglm_conversion.json")
    assert record["source"] == str(fixture_dir(version))
    assert record["folder"] == str(fixture_dir(version))
    assert record["original_config"]["model_type"] == "chatglm"
    assert load_json(target / "config.json")["model_type"] == "glm"

    with torch.no_grad():
        expected, _ = train_forward(backbone, goldens, None)
        for loaded in (load_hf_backbone(str(target)), load_chatglm2_backbone(target)):
            logits, _ = train_forward(loaded, goldens, None)
            assert torch.equal(logits, expected)
            assert not loaded.model.training


def test_converted_folder_keeps_tokenizer_files(tmp_path, version):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).symlink_to(fixture_dir(version) / name)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (source / name).symlink_to(fixture_dir(version) / "tokenizer" / name)

    target = save_converted(source, tmp_path / "converted", dtype=torch.bfloat16)
    assert (target / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    family = "chatglm3" if version == "v3" else "chatglm2"
    _, prompt_format = load_chatglm2_tokenizer_and_format(target, family=family)
    assert prompt_format.name == family
    assert load_chatglm2_backbone(target, dtype=torch.bfloat16).compute_dtype == torch.bfloat16


def test_sharded_bin_checkpoint_loads(tmp_path, backbone, goldens, version):
    tensors = safetensors.torch.load_file(str(fixture_dir(version) / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for file_name, shard_keys in shards.items():
        torch.save({key: tensors[key] for key in shard_keys}, tmp_path / file_name)
        weight_map.update(dict.fromkeys(shard_keys, file_name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copyfile(fixture_dir(version) / "config.json", tmp_path / "config.json")

    loaded = load_chatglm2_backbone(tmp_path)
    with torch.no_grad():
        expected, _ = train_forward(backbone, goldens, None)
        logits, _ = train_forward(loaded, goldens, None)
    assert torch.equal(logits, expected)


def write_checkpoint(folder: Path, version: str, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(exist_ok=True)
    shutil.copyfile(fixture_dir(version) / "config.json", folder / "config.json")
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"))


def test_key_check_lists_missing_and_unexpected(tmp_path, version):
    tensors = safetensors.torch.load_file(str(fixture_dir(version) / "model.safetensors"))
    del tensors["transformer.output_layer.weight"]
    tensors["transformer.encoder.layers.0.extra.weight"] = torch.zeros(2)
    tensors["transformer.prefix_encoder.embedding.weight"] = torch.zeros(4, 128)
    write_checkpoint(tmp_path, version, tensors)

    with pytest.raises(ChatGLM2CheckpointMismatchError) as raised:
        load_chatglm2_backbone(tmp_path)
    message = str(raised.value)
    assert "missing keys (after conversion): lm_head.weight" in message
    assert "transformer.encoder.layers.0.extra.weight" in message
    assert "transformer.prefix_encoder.embedding.weight" in message
    assert "import_reference_prefix" in message


def test_key_check_rejects_wrong_shapes(tmp_path, version):
    tensors = safetensors.torch.load_file(str(fixture_dir(version) / "model.safetensors"))
    tensors["transformer.encoder.layers.1.self_attention.query_key_value.weight"] = torch.zeros(96, 64)
    tensors["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(64, 100)
    write_checkpoint(tmp_path, version, tensors)

    with pytest.raises(ChatGLM2CheckpointMismatchError) as raised:
        load_chatglm2_backbone(tmp_path)
    message = str(raised.value)
    assert "layers.1.self_attention.query_key_value.weight has 96 rows, expected 128" in message
    assert "model.layers.0.mlp.down_proj.weight (64, 100), expected (64, 160)" in message


def test_config_conversion(version):
    original = load_json(fixture_dir(version) / "config.json")
    config = glm_config_from_chatglm(original)
    assert config.vocab_size == 1024
    assert config.intermediate_size == 160
    assert config.num_hidden_layers == 2
    assert config.num_key_value_heads == 2
    assert config.head_dim == 16
    assert config.rms_norm_eps == 1e-5
    assert config.attention_bias is True
    assert config.tie_word_embeddings is False
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.rope_parameters["rope_theta"] == 10000.0

    # GLM-4 and the long-context ChatGLM models scale the rotary base by rope_ratio.
    assert glm_config_from_chatglm({**original, "rope_ratio": 500}).rope_parameters["rope_theta"] == 5e6


def test_config_conversion_rejects_unsupported(version):
    original = load_json(fixture_dir(version) / "config.json")
    with pytest.raises(ValueError, match="rmsnorm=False is not supported"):
        glm_config_from_chatglm({**original, "rmsnorm": False})
    with pytest.raises(ValueError, match="multi_query_attention=False is not supported"):
        glm_config_from_chatglm({**original, "multi_query_attention": False})
    with pytest.raises(ValueError, match="kv_channels is missing"):
        glm_config_from_chatglm({key: value for key, value in original.items() if key != "kv_channels"})
    with pytest.raises(ValueError, match="model.family=chatglm"):
        glm_config_from_chatglm({**original, "position_encoding_2d": True})


def test_hub_ids_download_only_what_is_needed(monkeypatch, version):
    requests = []

    def fake_snapshot_download(repo_id, revision, allow_patterns):
        requests.append((repo_id, revision, allow_patterns))
        return str(fixture_dir(version))

    monkeypatch.setattr(chatglm2.huggingface_hub, "snapshot_download", fake_snapshot_download)
    load_chatglm2_backbone("THUDM/chatglm2-6b", revision="abc123")
    assert requests[0][:2] == ("THUDM/chatglm2-6b", "abc123")
    assert "*.safetensors" in requests[0][2]
    assert "pytorch_model*.bin" in requests[0][2]

    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_chatglm2_tokenizer_and_format("THUDM/chatglm2-6b")
    assert requests[1][2] == ["config.json", "tokenizer.model", "tokenizer_config.json"]


def test_missing_local_folder_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_chatglm2_backbone(tmp_path / "nothing" / "here")


# --------------------------------------------------------------------------------- gradient checkpointing


def prefix_gradients(backbone, goldens, encoder) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    encoder.zero_grad()
    logits, cache = train_forward(backbone, goldens, encoder(2))
    loss = shifted_loss(logits, goldens["train.labels"])
    loss.backward()
    grads = {name: parameter.grad.clone() for name, parameter in encoder.named_parameters()}
    return grads, cache.cache.layers[1].keys.detach()


def saved_activation_bytes(backbone, goldens, encoder, input_ids) -> int:
    """Sum the bytes of the tensors that autograd saves for backward in one training forward pass."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        cache = backbone.new_cache(encoder(input_ids.shape[0]), input_ids.shape[0])
        logits = backbone.forward(input_ids, torch.ones_like(input_ids), cache)
        logits.float().logsumexp(-1).mean().backward()
    return total


def test_gradient_checkpointing_keeps_prefix_gradients(version, goldens):
    backbone = load_chatglm2_backbone(fixture_dir(version))
    encoder = make_prefix_encoder(version, backbone, "prefix_proj")
    encoder.train()
    encoder.dropout.p = 0.0
    long_batch = torch.randint(3, 1000, (2, 256), generator=torch.Generator().manual_seed(0))

    expected_grads, expected_keys = prefix_gradients(backbone, goldens, encoder)
    plain_bytes = saved_activation_bytes(backbone, goldens, encoder, long_batch)

    backbone.enable_gradient_checkpointing()
    backbone.enable_gradient_checkpointing()  # a second call must not wrap the layers twice
    assert backbone.model.model.layers[0].prefix_gradient_checkpointing
    grads, keys = prefix_gradients(backbone, goldens, encoder)
    checkpointed_bytes = saved_activation_bytes(backbone, goldens, encoder, long_batch)

    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # The cache is extended once per layer, as without checkpointing: prefix plus the batch's tokens.
    assert keys.shape[-2] == PRE_SEQ_LEN + goldens["train.input_ids"].shape[1]
    torch.testing.assert_close(keys, expected_keys)
    # Only the layer inputs stay saved for backward, far less than every layer's activations.
    assert checkpointed_bytes < plain_bytes / 2


def test_gradient_checkpointing_leaves_generation_unchanged(version, goldens):
    backbone = load_chatglm2_backbone(fixture_dir(version))
    backbone.enable_gradient_checkpointing()
    encoder = make_prefix_encoder(version, backbone, "prefix")
    group = GENERATION_GROUP["prefix"]
    with torch.no_grad():
        tokens, _ = greedy_generate(
            backbone,
            goldens[f"{group}.input.input_ids"],
            goldens[f"{group}.input.attention_mask"],
            encoder(2),
            3,
        )
    assert torch.equal(tokens, goldens[f"{group}.new_tokens"][:, :3])
