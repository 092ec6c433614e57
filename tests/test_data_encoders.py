"""Our prompt encoders against the diffusers pipelines' own encode_prompt, on tiny random encoders."""

import pytest
import torch

from data.encoders import (
    QWEN_DROP_IDX,
    QWEN_TEMPLATE,
    QWEN_TOKENIZER_MAX_LENGTH,
    QwenImagePromptEncoder,
    UMT5PromptEncoder,
    load_prompt_encoder,
    resolve_encoder_path,
)
from tests.tiny_encoders import LONG_PROMPT, UNICODE_PROMPTS, save_tiny_encoder, tiny_parts, tiny_pipeline

PROMPTS = ["A red fox trotting through fresh snow", *UNICODE_PROMPTS, LONG_PROMPT, "", "  <b>html</b>  &amp; spaces  "]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def umt5():
    tok, te = tiny_parts("umt5")
    return tok, te, tiny_pipeline("umt5", tok, te)


@pytest.fixture(scope="module")
def qwen():
    tok, te = tiny_parts("qwen2.5-vl")
    return tok, te, tiny_pipeline("qwen2.5-vl", tok, te)


@pytest.mark.parametrize("max_length", [512, 16])
def test_umt5_equals_wan_pipeline(umt5, max_length):
    tok, te, pipe = umt5
    ours = UMT5PromptEncoder(tok, te, max_length).encode(PROMPTS)
    with torch.no_grad():  # the pipeline's __call__ runs encode_prompt under no_grad
        ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=max_length)
    assert ref.shape[1] == max_length
    for e, r in zip(ours, ref):
        n = e.shape[0]
        assert 1 <= n <= max_length
        assert torch.equal(e, r[:n]), "trimmed embedding differs from the pipeline's"
        assert not r[n:].any(), "the pipeline zero-pads past the true length: nothing was trimmed away"
    assert ours[3].shape[0] == max_length  # the long prompt is truncated, like the pipeline's tokenizer call
    assert ours[0].shape[0] < max_length


@pytest.mark.parametrize("max_length", [1024, 12])
def test_qwen_equals_qwenimage_pipeline(qwen, max_length):
    tok, te, pipe = qwen
    ours = QwenImagePromptEncoder(tok, te, max_length).encode(PROMPTS)
    with torch.no_grad():
        ref, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=max_length)
    assert mask is not None
    for e, r, m in zip(ours, ref, mask):
        n = int(m.sum())
        assert e.shape[0] == n and bool(m[:n].all()) and not m[n:].any()
        assert torch.equal(e, r[:n])
    assert ours[3].shape[0] == max_length  # 1024: the tokenizer cut the template end off, as in the pipeline


def test_qwen_template_matches_the_pipeline_and_the_tiny_tokenizer_drops_the_system_part(qwen):
    tok, _, pipe = qwen
    ref = (pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length)
    assert ref == (QWEN_TEMPLATE, QWEN_DROP_IDX, QWEN_TOKENIZER_MAX_LENGTH)
    prefix = QWEN_TEMPLATE.split("{}")[0]
    assert len(tok(prefix).input_ids) == QWEN_DROP_IDX  # as with the real Qwen2.5-VL tokenizer
    ids = tok(QWEN_TEMPLATE.format("a cat")).input_ids
    assert tok.decode(ids[QWEN_DROP_IDX:]).startswith("a cat<|im_end|>")


def test_bf16_encoders_match_bf16_pipelines(tmp_path):
    for kind, cls in (("umt5", UMT5PromptEncoder), ("qwen2.5-vl", QwenImagePromptEncoder)):
        path = save_tiny_encoder(kind, tmp_path / kind, layout="model")
        enc = load_prompt_encoder(kind, path, dtype="bf16", device="cpu", max_length=32)
        assert isinstance(enc, cls) and enc.dtype == torch.bfloat16
        ours = enc.encode(PROMPTS[:3])
        pipe = tiny_pipeline(kind, enc.tokenizer, enc.text_encoder)
        with torch.no_grad():
            if kind == "umt5":
                ref, _ = pipe.encode_prompt(PROMPTS[:3], do_classifier_free_guidance=False, max_sequence_length=32)
            else:
                ref, _ = pipe.encode_prompt(PROMPTS[:3], max_sequence_length=32)
        assert ref.dtype == torch.bfloat16
        assert all(torch.equal(e, r[: e.shape[0]]) for e, r in zip(ours, ref))


def test_encoder_path_layouts_and_errors(tmp_path):
    pipe_dir = save_tiny_encoder("umt5", tmp_path / "pipe", layout="pipeline")
    assert (pipe_dir / "model_index.json").is_file()
    assert resolve_encoder_path(pipe_dir) == (pipe_dir / "tokenizer", pipe_dir / "text_encoder")
    model_dir = save_tiny_encoder("qwen2.5-vl", tmp_path / "model", layout="model")
    assert resolve_encoder_path(model_dir) == (model_dir, model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer/ \\+ text_encoder/"):
        resolve_encoder_path(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_encoder_path(tmp_path / "missing")
    with pytest.raises(ValueError, match="'umt5' model, but --encoder qwen2.5-vl"):
        load_prompt_encoder("qwen2.5-vl", pipe_dir, dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="above 1024"):
        load_prompt_encoder("qwen2.5-vl", model_dir, dtype="fp32", device="cpu", max_length=2048)
