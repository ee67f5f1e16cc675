"""ChatGLM-6B model, backbone and loader against the outputs of the original remote code.

The goldens come from a 2-layer, hidden-64 model with random weights run through the original
`modeling_chatglm.py` in fp32 on CPU. Tolerances: logits and hidden states 1e-4
(values are O(10)), loss 1e-5, prefix keys and values 1e-6, token ids exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from helpers_chatglm import greedy_generate, load_json, v1_fixture_dir
from ptuning_pl.backbones import chatglm6b
from ptuning_pl.backbones.base import KVGeometry
from ptuning_pl.backbones.chatglm6b import (
    ChatGLM6BBackbone,
    CheckpointMismatchError,
    export_reference_prefix,
    import_reference_prefix,
    load_chatglm6b,
    load_chatglm6b_backbone,
)
from ptuning_pl.chatglm.modeling_v1 import (
    ChatGLM6BConfig,
    ChatGLM6BForCausalLM,
    build_attention_layout,
    build_position_ids,
    find_prompt_boundaries,
    rotary_inverse_frequencies,
)
from ptuning_pl.chatglm.tokenization_v1 import ChatGLM6BTokenizer
from ptuning_pl.prefix import PrefixEncoder

LOGITS_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
PREFIX_TOLERANCE = 1e-6
PRE_SEQ_LEN = 4

# Golden group name -> (prefix file, prefix_projection); None means the base model without a prefix.
VARIANTS = {
    "base": None,
    "prefix": ("prefix_encoder.safetensors", False),
    "prefix_proj": ("prefix_encoder_proj.safetensors", True),
}
FORWARD_GROUP = {"base": "fwd", "prefix": "fwd_prefix", "prefix_proj": "fwd_prefix_proj"}
GENERATION_GROUP = {"base": "gen", "prefix": "gen_prefix", "prefix_proj": "gen_prefix_proj"}
PREFIX_KV_GROUP = {"prefix": "prefix_kv", "prefix_proj": "prefix_kv_proj"}


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    return v1_fixture_dir()


@pytest.fixture(scope="module")
def goldens(fixture_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(fixture_dir / "goldens.safetensors"))


@pytest.fixture(scope="module")
def backbone(fixture_dir) -> ChatGLM6BBackbone:
    return load_chatglm6b_backbone(fixture_dir)


def make_prefix_encoder(fixture_dir: Path, backbone: ChatGLM6BBackbone, variant: str) -> PrefixEncoder | None:
    if VARIANTS[variant] is None:
        return None
    file_name, projection = VARIANTS[variant]
    encoder = PrefixEncoder(PRE_SEQ_LEN, backbone.geometry, prefix_projection=projection, family="chatglm")
    encoder.load_state_dict(import_reference_prefix(fixture_dir / file_name))
    return encoder.eval()


def train_padding_mask(goldens) -> torch.Tensor:
    """1 for real tokens of the right-padded training batch: everything up to and including <eop>."""
    eos_token_id = json.loads((v1_fixture_dir() / "config.json").read_text())["eos_token_id"]
    input_ids = goldens["train.input_ids"]
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(input_ids.tolist()):
        mask[row, : ids.index(eos_token_id) + 1] = 1
    return mask


def generation_padding_mask(goldens, group: str) -> torch.Tensor:
    """1 for real prompt tokens: the diagonal of the original's 3-D mask is masked only for padding."""
    diagonal = goldens[f"{group}.input.attention_mask"][:, 0].diagonal(dim1=1, dim2=2)
    return (diagonal == 0).long()


# --------------------------------------------------------------------------------------------------------
# Layout


def test_rotary_frequencies_rounded_to_fp16(backbone, goldens):
    inverse_frequencies = rotary_inverse_frequencies(backbone.config)
    assert torch.equal(inverse_frequencies, goldens["rotary_inv_freq"])


def test_training_layout_matches_original(backbone, goldens):
    input_ids = goldens["train.input_ids"]
    padding_mask = train_padding_mask(goldens)
    context_lengths, mask_positions = find_prompt_boundaries(input_ids, padding_mask, backbone.config)
    positions = build_position_ids(padding_mask, context_lengths, mask_positions)

    for group, prefix_length in (("fwd", 0), ("fwd_prefix", PRE_SEQ_LEN)):
        allowed = build_attention_layout(padding_mask, context_lengths, input_ids.shape[1], prefix_length)
        golden_masked = goldens[f"{group}.layer0_attention_mask"].bool()
        for row in range(input_ids.shape[0]):
            real = padding_mask[row].bool()
            key_columns = torch.cat([torch.ones(prefix_length, dtype=torch.bool), real])
            ours = allowed[row, 0][real][:, key_columns]
            theirs = ~golden_masked[row, 0][real][:, key_columns]
            assert torch.equal(ours, theirs), f"{group} row {row}"

    golden_positions = goldens["fwd.layer0_position_ids"]
    for row in range(input_ids.shape[0]):
        real = padding_mask[row].bool()
        assert torch.equal(positions[row][:, real], golden_positions[row][:, real]), f"row {row}"


def test_left_padded_layout_matches_tokenizer(backbone, goldens):
    input_ids = goldens["gen.input.input_ids"]
    padding_mask = generation_padding_mask(goldens, "gen")
    context_lengths, mask_positions = find_prompt_boundaries(input_ids, padding_mask, backbone.config)
    positions = build_position_ids(padding_mask, context_lengths, mask_positions)
    allowed = build_attention_layout(padding_mask, context_lengths, input_ids.shape[1], 0)

    assert torch.equal(positions, goldens["gen.input.position_ids"])
    golden_masked = goldens["gen.input.attention_mask"].bool()
    for row in range(input_ids.shape[0]):
        real = padding_mask[row].bool()
        assert torch.equal(allowed[row, 0][real][:, real], ~golden_masked[row, 0][real][:, real])
        # Padding keys are never visible to real queries.
        assert not allowed[row, 0][real][:, ~real].any()


def test_prompt_without_sop_raises(backbone):
    config = backbone.config
    input_ids = torch.tensor([[11, 12, config.gmask_token_id]])
    cache = backbone.new_cache(None, 1)
    with pytest.raises(ValueError, match="no <sop> token"):
        backbone.forward(input_ids, torch.ones_like(input_ids), cache)


def test_prompt_without_mask_token_raises(backbone):
    config = backbone.config
    input_ids = torch.tensor([[11, 12, config.bos_token_id]])
    cache = backbone.new_cache(None, 1)
    with pytest.raises(ValueError, match="neither \\[gMASK\\]"):
        backbone.forward(input_ids, torch.ones_like(input_ids), cache)


# --------------------------------------------------------------------------------------------------------
# Forward pass and prefix


@pytest.mark.parametrize("variant", ["prefix", "prefix_proj"])
def test_prefix_key_values_match_original(fixture_dir, backbone, goldens, variant):
    encoder = make_prefix_encoder(fixture_dir, backbone, variant)
    with torch.no_grad():
        prefix = encoder(batch_size=2)
    for layer, (key, value) in enumerate(prefix):
        # Golden layout: (2 = key/value, pre_seq_len, batch, heads, head_dim).
        golden = goldens[f"{PREFIX_KV_GROUP[variant]}.layer{layer}"].permute(0, 2, 3, 1, 4)
        assert (key - golden[0]).abs().max().item() <= PREFIX_TOLERANCE, f"layer {layer} keys"
        assert (value - golden[1]).abs().max().item() <= PREFIX_TOLERANCE, f"layer {layer} values"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_original(fixture_dir, backbone, goldens, variant):
    group = FORWARD_GROUP[variant]
    encoder = make_prefix_encoder(fixture_dir, backbone, variant)
    input_ids = goldens["train.input_ids"]
    labels = goldens["train.labels"]
    padding_mask = train_padding_mask(goldens)

    with torch.no_grad():
        prefix = None if encoder is None else encoder(batch_size=2)
        cache = backbone.new_cache(prefix, 2)
        output = backbone.forward_with_hidden_states(input_ids, padding_mask, cache)

    real = padding_mask.bool()
    logits_error = (output.logits - goldens[f"{group}.logits"]).abs()[real].max().item()
    assert logits_error <= LOGITS_TOLERANCE

    assert len(output.hidden_states) == 3
    for index, hidden in enumerate(output.hidden_states):
        # Golden layout: (seq, batch, hidden).
        golden = goldens[f"{group}.hidden_states.{index}"].transpose(0, 1)
        assert (hidden - golden).abs()[real].max().item() <= LOGITS_TOLERANCE, f"hidden state {index}"

    shifted_logits = output.logits[:, :-1].float()
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert abs(loss.item() - goldens[f"{group}.loss"].item()) <= LOSS_TOLERANCE

    # Layer-0 cache: prefix first, then the rotated keys. Golden layout: (kv_seq, batch, heads, head_dim).
    key, value = cache.key_values[0]
    key_columns = torch.cat([torch.ones(2, cache.prefix_length, dtype=torch.bool), real], dim=1)
    for name, ours, golden in (
        ("key", key, goldens[f"{group}.present_key_layer0"]),
        ("value", value, goldens[f"{group}.present_value_layer0"]),
    ):
        difference = (ours.permute(2, 0, 1, 3) - golden).abs().permute(1, 0, 2, 3)
        assert difference[key_columns].max().item() <= LOGITS_TOLERANCE, f"layer-0 {name}s"


# --------------------------------------------------------------------------------------------------------
# Greedy generation


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_original(fixture_dir, backbone, goldens, variant):
    group = GENERATION_GROUP[variant]
    encoder = make_prefix_encoder(fixture_dir, backbone, variant)
    input_ids = goldens[f"{group}.input.input_ids"]
    padding_mask = generation_padding_mask(goldens, group)
    expected = goldens[f"{group}.new_tokens"]
    # The loop runs all steps, which matches generate() only while no row has finished.
    assert backbone.config.eos_token_id not in expected.tolist()

    with torch.no_grad():
        prefix = None if encoder is None else encoder(batch_size=input_ids.shape[0])
        tokens, scores = greedy_generate(backbone, input_ids, padding_mask, prefix, max_new_tokens=8)

    assert tokens.tolist() == expected.tolist()
    assert (scores - goldens[f"{group}.scores"]).abs().max().item() <= LOGITS_TOLERANCE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_ignores_padding(fixture_dir, backbone, goldens, variant):
    group = GENERATION_GROUP[variant]
    encoder = make_prefix_encoder(fixture_dir, backbone, variant)
    input_ids = goldens[f"{group}.input.input_ids"]
    padding_mask = generation_padding_mask(goldens, group)
    expected = goldens[f"{group}.new_tokens"]
    pad_id = backbone.config.pad_token_id

    with torch.no_grad():
        for row in range(input_ids.shape[0]):
            alone = input_ids[row][padding_mask[row].bool()].unsqueeze(0)
            prefix = None if encoder is None else encoder(batch_size=1)
            tokens, _ = greedy_generate(backbone, alone, torch.ones_like(alone), prefix, max_new_tokens=8)
            assert tokens[0].tolist() == expected[row].tolist(), f"row {row} alone"

        extra = 3
        padded_ids = torch.cat([torch.full((input_ids.shape[0], extra), pad_id), input_ids], dim=1)
        padded_mask = torch.cat(
            [torch.zeros(input_ids.shape[0], extra, dtype=torch.long), padding_mask], dim=1
        )
        prefix = None if encoder is None else encoder(batch_size=input_ids.shape[0])
        tokens, _ = greedy_generate(backbone, padded_ids, padded_mask, prefix, max_new_tokens=8)
    assert tokens.tolist() == expected.tolist()


def test_reorder_cache_swaps_rows(backbone, goldens):
    input_ids = goldens["gen.input.input_ids"]
    padding_mask = generation_padding_mask(goldens, "gen")
    next_tokens = torch.tensor([[20], [30]])
    step_mask = torch.cat([padding_mask, torch.ones_like(next_tokens)], dim=1)

    with torch.no_grad():
        cache = backbone.new_cache(None, 2)
        backbone.forward(input_ids, padding_mask, cache)
        swapped = backbone.reorder_cache(cache, torch.tensor([1, 0]))
        expected = backbone.forward(next_tokens, step_mask, cache)
        logits = backbone.forward(next_tokens.flip(0), step_mask.flip(0), swapped)
    assert torch.allclose(logits, expected.flip(0), atol=1e-5)


def test_new_cache_rejects_wrong_prefix_shape(backbone):
    geometry = backbone.geometry
    key = torch.zeros(2, geometry.kv_heads + 1, PRE_SEQ_LEN, geometry.head_dim)
    prefix = [(key, key)] * geometry.num_layers
    with pytest.raises(ValueError, match="prefix key of layer 0 has shape"):
        backbone.new_cache(prefix, 2)


# --------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def test_gradient_checkpointing_gives_same_prefix_gradients(fixture_dir, goldens):
    input_ids = goldens["train.input_ids"]
    labels = goldens["train.labels"]
    padding_mask = train_padding_mask(goldens)

    gradients = []
    for checkpointing in (False, True):
        backbone = load_chatglm6b_backbone(fixture_dir)
        if checkpointing:
            backbone.enable_gradient_checkpointing()
        encoder = make_prefix_encoder(fixture_dir, backbone, "prefix_proj")
        cache = backbone.new_cache(encoder(batch_size=2), 2)
        logits = backbone.forward(input_ids, padding_mask, cache)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        gradients.append({name: parameter.grad.clone() for name, parameter in encoder.named_parameters()})

    plain, checkpointed = gradients
    assert set(plain) == {
        "embedding.weight",
        "trans.0.weight",
        "trans.0.bias",
        "trans.2.weight",
        "trans.2.bias",
    }
    for name in plain:
        assert plain[name].abs().sum() > 0, f"{name} received no gradient"
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------
# Loading


def base_state_dict(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(fixture_dir / "model.safetensors"))


def write_model_folder(
    folder: Path, fixture_dir: Path, shards: list[dict[str, torch.Tensor]], kind: str
) -> Path:
    """Write config.json and the shards as safetensors or .bin, with an index file when there are several."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fixture_dir / "config.json", folder / "config.json")
    extension = "safetensors" if kind == "safetensors" else "bin"
    stem = "model" if kind == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = (
            f"{stem}.{extension}"
            if len(shards) == 1
            else f"{stem}-{number:05d}-of-{len(shards):05d}.{extension}"
        )
        if kind == "safetensors":
            safetensors.torch.save_file(shard, str(folder / name))
        else:
            torch.save(shard, folder / name)
        weight_map.update({key: name for key in shard})
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / f"{stem}.{extension}.index.json").write_text(json.dumps(index))
    return folder


def split_in_two(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    keys = sorted(state)
    half = len(keys) // 2
    return [{key: state[key] for key in keys[:half]}, {key: state[key] for key in keys[half:]}]


def prompt_logits(backbone: ChatGLM6BBackbone, goldens) -> torch.Tensor:
    input_ids = goldens["gen.input.input_ids"]
    with torch.no_grad():
        cache = backbone.new_cache(None, 2)
        return backbone.forward(input_ids, generation_padding_mask(goldens, "gen"), cache)


@pytest.mark.parametrize(
    "kind, sharded, keep_head",
    [
        ("safetensors", True, True),
        ("bin", False, True),
        ("bin", True, False),
        ("safetensors", False, False),
    ],
)
def test_loader_reads_checkpoint_layouts(tmp_path, fixture_dir, backbone, goldens, kind, sharded, keep_head):
    state = base_state_dict(fixture_dir)
    if not keep_head:
        del state["lm_head.weight"]
    shards = split_in_two(state) if sharded else [state]
    folder = write_model_folder(tmp_path / "model", fixture_dir, shards, kind)

    loaded = load_chatglm6b_backbone(folder)
    assert torch.equal(prompt_logits(loaded, goldens), prompt_logits(backbone, goldens))


def test_loader_lists_renamed_key(tmp_path, fixture_dir):
    state = base_state_dict(fixture_dir)
    state["transformer.layers.1.attention.dense.kernel"] = state.pop(
        "transformer.layers.1.attention.dense.weight"
    )
    folder = write_model_folder(tmp_path / "model", fixture_dir, [state], "safetensors")

    with pytest.raises(CheckpointMismatchError) as error:
        load_chatglm6b_backbone(folder)
    message = str(error.value)
    assert "missing keys: transformer.layers.1.attention.dense.weight" in message
    assert "unexpected keys: transformer.layers.1.attention.dense.kernel" in message


def test_loader_lists_missing_key(tmp_path, fixture_dir):
    state = base_state_dict(fixture_dir)
    del state["transformer.final_layernorm.bias"]
    folder = write_model_folder(tmp_path / "model", fixture_dir, [state], "bin")

    with pytest.raises(CheckpointMismatchError, match="missing keys: transformer.final_layernorm.bias"):
        load_chatglm6b_backbone(folder)


def test_loader_rejects_wrong_shape(tmp_path, fixture_dir):
    state = base_state_dict(fixture_dir)
    state["transformer.final_layernorm.bias"] = torch.zeros(65)
    folder = write_model_folder(tmp_path / "model", fixture_dir, [state], "safetensors")

    with pytest.raises(
        CheckpointMismatchError, match=r"transformer.final_layernorm.bias \(65,\) \(expected \(64,\)\)"
    ):
        load_chatglm6b_backbone(folder)


def test_loader_rejects_untied_head(tmp_path, fixture_dir):
    state = base_state_dict(fixture_dir)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    folder = write_model_folder(tmp_path / "model", fixture_dir, [state], "safetensors")

    with pytest.raises(CheckpointMismatchError, match="lm_head.weight differs"):
        load_chatglm6b_backbone(folder)


def test_loader_rejects_prefix_keys_with_hint(tmp_path, fixture_dir):
    state = base_state_dict(fixture_dir)
    state.update(safetensors.torch.load_file(str(fixture_dir / "prefix_encoder.safetensors")))
    folder = write_model_folder(tmp_path / "model", fixture_dir, [state], "safetensors")

    with pytest.raises(CheckpointMismatchError, match="import_reference_prefix"):
        load_chatglm6b_backbone(folder)


def test_loader_reports_missing_weights(tmp_path, fixture_dir):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copyfile(fixture_dir / "config.json", folder / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_chatglm6b_backbone(folder)


def test_loader_applies_dtype(fixture_dir, goldens):
    loaded = load_chatglm6b_backbone(fixture_dir, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.compute_dtype == torch.bfloat16
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    logits = prompt_logits(loaded, goldens)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


def test_loader_downloads_hub_id(monkeypatch, fixture_dir):
    requests = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        requests.append((repo_id, revision, allow_patterns))
        return str(fixture_dir)

    monkeypatch.setattr(chatglm6b.huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = load_chatglm6b_backbone("THUDM/chatglm-6b", revision="abc123")
    assert requests[0][:2] == ("THUDM/chatglm-6b", "abc123")
    assert "config.json" in requests[0][2]
    assert loaded.config.num_layers == 2


def test_loader_rejects_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_chatglm6b_backbone(tmp_path / "nowhere")


def test_load_chatglm6b_rejects_foreign_tokenizer(fixture_dir):
    # The tiny model's special tokens sit at 1000+, the real tokenizer's at 130000+.
    with pytest.raises(ValueError, match="disagree on special-token ids"):
        load_chatglm6b(fixture_dir, tokenizer_path=fixture_dir / "tokenizer")


def test_load_chatglm6b_pairs_model_and_tokenizer(tmp_path, fixture_dir):
    tokenizer = ChatGLM6BTokenizer.from_pretrained(fixture_dir / "tokenizer")
    config_values = load_json(fixture_dir / "config.json")
    config_values.update(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        inner_hidden_size=32,
        num_attention_heads=2,
        num_layers=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_values))
    torch.manual_seed(0)
    model = ChatGLM6BForCausalLM(ChatGLM6BConfig.from_dict(config_values))
    safetensors.torch.save_file(dict(model.state_dict()), str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)

    backbone, loaded_tokenizer = load_chatglm6b(folder)
    input_ids = torch.tensor([loaded_tokenizer.encode("你好")])
    with torch.no_grad():
        logits = backbone.forward(input_ids, torch.ones_like(input_ids), backbone.new_cache(None, 1))
    assert logits.shape == (1, input_ids.shape[1], tokenizer.vocab_size)


# --------------------------------------------------------------------------------------------------------
# Prefix exchange with the reference implementation


@pytest.mark.parametrize("variant", ["prefix", "prefix_proj"])
@pytest.mark.parametrize("target", ["prefix.safetensors", "prefix.bin", "folder"])
def test_reference_prefix_round_trip(tmp_path, fixture_dir, variant, target):
    file_name, _ = VARIANTS[variant]
    original = safetensors.torch.load_file(str(fixture_dir / file_name))
    state = import_reference_prefix(fixture_dir / file_name)

    written = export_reference_prefix(state, tmp_path / target)
    if target == "folder":
        assert written == tmp_path / "folder" / "pytorch_model.bin"
    reloaded = import_reference_prefix(tmp_path / target)

    assert set(reloaded) == set(state)
    for name in state:
        assert torch.equal(reloaded[name], state[name]), name
    written_keys = set(chatglm6b._read_tensor_file(written))
    assert written_keys == set(original)


def test_reference_prefix_rejects_incomplete_projection(tmp_path, fixture_dir):
    tensors = safetensors.torch.load_file(str(fixture_dir / "prefix_encoder_proj.safetensors"))
    del tensors["transformer.prefix_encoder.trans.2.bias"]
    safetensors.torch.save_file(tensors, str(tmp_path / "prefix.safetensors"))
    with pytest.raises(ValueError, match="incomplete prefix projection"):
        import_reference_prefix(tmp_path / "prefix.safetensors")


def test_reference_prefix_export_rejects_foreign_keys(tmp_path):
    with pytest.raises(ValueError, match="not PrefixEncoder parameters"):
        export_reference_prefix(
            {"embedding.weight": torch.zeros(1), "extra": torch.zeros(1)}, tmp_path / "p.bin"
        )


def test_prefix_geometry_matches_reference_widths(backbone):
    assert backbone.prefix_family == "chatglm"
    assert backbone.geometry == KVGeometry(num_layers=2, kv_heads=4, head_dim=16, hidden_size=64)
