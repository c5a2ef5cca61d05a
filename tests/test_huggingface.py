"""Hugging Face ``transformers`` models, as their users train them: ``model(input_ids=ids)``
with the causal-LM loss ``cross_entropy(logits.view(-1, V), labels.view(-1))`` (GPT-2, LLaMA)
or a sequence classifier's cross-entropy (BERT); small configurations, float64, eval mode.

They compile with an example batch (``compile(..., example=(ids, y))``, ``fxcurv/example.py``):
Hugging Face unpacks shapes (``(*x.shape[:-1], -1, d)``: the example fixes their lengths),
branches on them (its mask code's ``if batch_size != position_ids.shape[0]``: the way the
example goes, checked when the step runs), and calls a module object from outside the model
(``apply_rotary_pos_emb`` wrapped by the kernel hub: traced through as a function). The
default call, with its empty key/value cache and grouped-query SDPA, gives the same numbers.

Checked against per-sample brute force with no fxcurv code: per-sample gradients by
``torch.func.grad`` of each sample's share of the loss, ``diag_ggn_exact`` as the diagonal of
``Σ_n J_nᵀ H_n J_n`` (``jacrev``, ``hessian``); ``kfac`` runs. Parameters are redrawn at unit
scale so the logits are O(1) (the default initialisation gives logits of 1e-2)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import fxcurv

transformers = pytest.importorskip("transformers")

DTYPE = torch.float64
TOL = dict(rtol=1e-8, atol=1e-11)
VOCAB, T, N = 40, 6, 3


def _gpt2():
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=VOCAB,
                                     n_positions=T, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=12,
                                      vocab_size=VOCAB, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(config)


def _bert():
    config = transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, vocab_size=VOCAB,
                                     max_position_embeddings=T, num_labels=3)
    return transformers.BertForSequenceClassification(config)


class Logits(nn.Module):
    """``model(input_ids=ids).logits``, as a training loop reads them (no cache)."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model, self.causal = model, causal

    def forward(self, ids):
        if self.causal:
            return self.model(input_ids=ids, use_cache=False).logits
        return self.model(input_ids=ids).logits


def causal_lm_loss(logits, labels):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


MODELS = {"gpt2": (_gpt2, True), "llama": (_llama, True), "bert": (_bert, False)}


def _spread(model: nn.Module) -> None:
    """Matrices ``N(0, 1/fan_in)``, biases ``0.3 N(0, 1)``, scales ``1 + 0.3 N(0, 1)``."""
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.size(-1) ** -0.5)
            elif param_name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(1.0, 0.3)


@functools.lru_cache(maxsize=None)
def prepared(name: str):
    make, causal = MODELS[name]
    torch.manual_seed(0)
    model = Logits(make(), causal).to(DTYPE).eval()
    _spread(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, T), generator=gen)
    y = torch.randint(0, VOCAB, (N, T), generator=gen) if causal else \
        torch.randint(0, 3, (N,), generator=gen)
    loss_fn = causal_lm_loss if causal else nn.CrossEntropyLoss()
    with torch.no_grad():
        spread = model(ids).std().item()
    assert 0.1 < spread < 10, f"logits of {name} are not O(1): std {spread}"
    return model, loss_fn, ids, y


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    model, loss_fn, ids, y = prepared(name)
    step = fxcurv.compile(model, loss_fn, ["batch_grad", "diag_ggn_exact", "kfac"],
                          example=(ids, y))
    return step, step(ids, y)


@functools.lru_cache(maxsize=None)
def brute_force(name: str):
    """``(grads [N, P], ggn diagonal [P])``: each sample's share of the batch loss alone."""
    model, loss_fn, ids, y = prepared(name)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, sizes = list(params), [p.numel() for p in params.values()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def logits(flat, ids_n):
        pieces = {n: t.reshape(params[n].shape) for n, t in zip(names, flat.split(sizes))}
        return functional_call(model, pieces, (ids_n,))

    def share(z, y_n):
        return loss_fn(z, y_n) * y_n.shape[0] / y.shape[0]

    grads, diagonal = [], torch.zeros_like(theta)
    for n in range(N):
        ids_n, y_n = ids[n:n + 1], y[n:n + 1]
        grads.append(torch.func.grad(lambda flat: share(logits(flat, ids_n), y_n))(theta))
        z = logits(theta, ids_n)
        jac = jacrev(logits)(theta, ids_n).reshape(z.numel(), -1)
        h = hessian(lambda out: share(out, y_n))(z).reshape(z.numel(), z.numel())
        diagonal += ((h @ jac) * jac).sum(0)
    return names, torch.stack(grads), diagonal


def _flat(values: dict, lead: int = 0) -> torch.Tensor:
    return torch.cat([v.reshape(*v.shape[:lead], -1) for v in values.values()], dim=-1)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_per_sample_gradients_match_brute_force(name):
    model, loss_fn, ids, y = prepared(name)
    names, grads, _ = brute_force(name)
    _, (loss, grad, batch_grad, _, _) = compiled(name)
    torch.testing.assert_close(loss, loss_fn(model(ids), y), **TOL)
    assert list(grad) == names
    torch.testing.assert_close(_flat(grad), grads.sum(0), **TOL)
    torch.testing.assert_close(_flat(batch_grad, 1), grads, **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_diag_ggn_exact_matches_brute_force(name):
    """LLaMA's RMSNorm computes in float32 whatever the input's dtype
    (``hidden_states.to(torch.float32)``), so the two orders of summation, ``J_nᵀ H_n J_n``
    from ``jacrev`` and fxcurv's propagated columns, agree to float32's precision there
    (2.6e-7 relative; 2.6e-15 with that RMSNorm computing in float64)."""
    _, _, diagonal = brute_force(name)
    _, (_, _, _, diag_ggn, _) = compiled(name)
    tolerance = dict(rtol=1e-5, atol=1e-8) if name == "llama" else TOL
    torch.testing.assert_close(_flat(diag_ggn), diagonal, **tolerance)


@pytest.mark.parametrize("name", list(MODELS))
def test_kfac_runs(name):
    _, (_, _, _, _, kfac) = compiled(name)
    for param, factors in kfac.items():
        assert all(torch.isfinite(f).all() for f in factors), param


class DefaultCall(nn.Module):
    """``model(input_ids=ids).logits`` with the defaults: an empty key/value cache
    concatenated with each layer's keys (``cat([tensor([]), k], -2)``), and LLaMA's grouped
    key/value heads passed to SDPA with ``enable_gqa=True``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_default_call_with_its_cache_gives_the_same_quantities(name):
    model, loss_fn, ids, y = prepared(name)
    step = fxcurv.compile(DefaultCall(model.model), loss_fn, ["batch_grad", "diag_ggn_exact"],
                          example=(ids, y))
    _, grad, batch_grad, diag_ggn = step(ids, y)
    _, (_, grad_ref, batch_grad_ref, diag_ggn_ref, _) = compiled(name)
    torch.testing.assert_close(grad, grad_ref, **TOL)
    torch.testing.assert_close(batch_grad, batch_grad_ref, **TOL)
    torch.testing.assert_close(diag_ggn, diag_ggn_ref, **TOL)


def test_another_batch_size_runs_and_one_sample_is_checked():
    """The step serves other batch sizes; GPT-2's mask code branches on ``batch_size !=
    position_ids.shape[0]`` (true from two samples on), so one sample raises naming it."""
    model, loss_fn, ids, y = prepared("gpt2")
    step, _ = compiled("gpt2")
    more = torch.cat([ids, ids[:2]]), torch.cat([y, y[:2]])
    loss, grad, *_ = step(*more)
    torch.testing.assert_close(loss, loss_fn(model(more[0]), more[1]), **TOL)
    expected = torch.autograd.grad(loss_fn(model(more[0]), more[1]),
                                   list(model.parameters()))
    torch.testing.assert_close(list(grad.values()), list(expected), **TOL)
    with pytest.raises(ValueError, match="branches on the number of samples at node"):
        step(ids[:1], y[:1])


# more families, first-order quantities against per-sample autograd: name -> (config class,
# model class, config keywords, input kind); "lm": causal LM on token ids, "text": sequence
# classifier on token ids, "image": image classifier on 16x16 pixels, "pooled": an image
# encoder's pooled output as the logits (SigLIP's attention-pooling head)
SMALL = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
             vocab_size=VOCAB, max_position_embeddings=16)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=1), "lm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=1), "lm"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(SMALL, num_key_value_heads=1, pad_token_id=0),
             "lm"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL, "lm"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=12,
                 vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=8), "lm"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=VOCAB), "lm"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=8, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=16,
                  rotary_dim=2), "lm"),
    "phi": ("PhiConfig", "PhiForCausalLM", SMALL, "lm"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(SMALL, max_position_embeddings=20, num_labels=3), "text"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=8, n_layers=1, n_heads=2, hidden_dim=12, vocab_size=VOCAB,
                        max_position_embeddings=16, num_labels=3), "text"),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification",
               dict(SMALL, embedding_size=8, num_labels=3), "text"),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(SMALL, num_labels=3), "text"),
    "funnel": ("FunnelConfig", "FunnelForSequenceClassification",
               dict(vocab_size=VOCAB, d_model=8, block_sizes=[1, 1], n_head=2, d_head=4,
                    d_inner=12, num_labels=3), "text"),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=12, image_size=16, patch_size=4, num_labels=3), "image"),
    "swin": ("SwinConfig", "SwinForImageClassification",
             dict(embed_dim=8, depths=[1, 1], num_heads=[2, 2], image_size=16, patch_size=2,
                  window_size=2, num_labels=3), "image"),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification",
                 dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3),
                 "image"),
    "beit": ("BeitConfig", "BeitForImageClassification",
             dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=12, image_size=16, patch_size=4, num_labels=3,
                  use_relative_position_bias=True), "image"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel",
               dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=12, image_size=16, patch_size=4), "pooled"),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=12, num_layers=1,
                num_decoder_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0),
           "seq2seq"),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=VOCAB, d_model=8, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=12,
                  decoder_ffn_dim=12, max_position_embeddings=16, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), "seq2seq"),
}


class Call(nn.Module):
    """``model(x).logits``: token ids or pixels as the first argument."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


class Pooled(Call):
    """``model(x).pooler_output`` as the logits."""

    def forward(self, x):
        return self.model(x).pooler_output


class EncoderDecoder(Call):
    """An encoder-decoder on ``x = {"src": ids, "tgt": decoder ids}`` (a structured input)."""

    def forward(self, x):
        return self.model(input_ids=x["src"], decoder_input_ids=x["tgt"]).logits


def _sample(x, n: int):
    return {k: v[n:n + 1] for k, v in x.items()} if isinstance(x, dict) else x[n:n + 1]


def _family(name: str):
    config, model_class, kwargs, kind = FAMILIES[name]
    if not hasattr(transformers, model_class):
        pytest.skip(f"transformers {transformers.__version__} has no {model_class}")
    torch.manual_seed(0)
    wrapper = {"seq2seq": EncoderDecoder, "pooled": Pooled}.get(kind, Call)
    model = wrapper(getattr(transformers, model_class)(getattr(transformers, config)(**kwargs)))
    model = model.to(DTYPE).eval()
    _spread(model)
    gen = torch.Generator().manual_seed(1)
    if kind in ("image", "pooled"):
        x = torch.randn(N, 3, 16, 16, dtype=DTYPE, generator=gen)
    elif kind == "seq2seq":
        x = {"src": torch.randint(3, VOCAB, (N, T), generator=gen),
             "tgt": torch.randint(3, VOCAB, (N, T - 1), generator=gen)}
    else:
        x = torch.randint(1, VOCAB, (N, T), generator=gen)
    if kind in ("lm", "seq2seq"):
        y = torch.randint(0, VOCAB, (N, T - (kind == "seq2seq")), generator=gen)
    else:
        y = torch.randint(0, 3, (N,), generator=gen)
    return model, causal_lm_loss if kind in ("lm", "seq2seq") else nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("name", list(FAMILIES))
def test_first_order_quantities_of_more_families_match_autograd(name):
    """Swin's window partition gives each sample several rows (``test_merged_rows.py``); OPT
    builds a mask with ``torch.ones(inputs_embeds.shape[0], T)``, DeBERTa a scale with
    ``torch.tensor(q.size(-1), dtype=torch.float)`` (recorded as calls) and a fill value
    ``torch.finfo(q.dtype).min`` (the example's dtype). BART's positions are expanded to the
    number of samples read from ``ids.shape[:2]`` (a slice of a shape: sizes, and the
    expanded positions one row per sample); T5's relative position bias is built from
    ``key_states.shape[-2]`` (an axis counted from the end, placed by the example's rank:
    no samples in it). T5's norm computes in float32 (agreement to 1e-8). BEiT fills its
    relative position index with ``index[0, 0:] = num_relative_distance - 3``, a number computed
    from sizes (a traced number assigned); SigLIP's pooling head copies its query parameter
    once per sample, ``probe.repeat(batch_size, 1, 1)`` (before, both were refused). Funnel
    pools with ``axis %= x.ndim`` (the example's rank, then checked) and
    ``torch.cat(..., axis=axis)`` (NumPy's keyword), and reads its dtype as
    ``next(p.dtype for p in self.parameters() if p.is_floating_point())`` (before: a trace
    error, a rule-less call)."""
    model, loss_fn, x, y = _family(name)
    step = fxcurv.compile(model, loss_fn, ["batch_grad", "kfac"], example=(x, y))
    assert_first_order_and_kfac(model, loss_fn, x, y, *step(x, y),
                                dict(rtol=1e-6, atol=1e-8) if name == "t5" else TOL)


def assert_first_order_and_kfac(model, loss_fn, x, y, loss, grad, batch_grad, kfac,
                                tolerance) -> None:
    """Loss, gradient and per-sample gradients against autograd; finite ``kfac`` factors."""
    torch.testing.assert_close(loss, loss_fn(model(x), y), **TOL)
    params = [p for _, p in model.named_parameters()]
    for n in range(N):
        share = torch.autograd.grad(loss_fn(model(_sample(x, n)), y[n:n + 1]) / N, params,
                                    allow_unused=True)
        for (param, value), expected in zip(batch_grad.items(), share):
            expected = torch.zeros_like(value[n]) if expected is None else expected
            torch.testing.assert_close(value[n], expected, **tolerance,
                                       msg=f"{param}, sample {n}")
    expected = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
    for (param, value), reference in zip(grad.items(), expected):
        if reference is not None:
            torch.testing.assert_close(value, reference, **tolerance, msg=param)
    for param, factors in kfac.items():
        assert all(torch.isfinite(f).all() for f in factors), param



def test_bloom_in_train_mode_differentiates_its_custom_gelu_when_asked():
    """Bloom's MLP applies its GELU through a custom ``autograd.Function`` in train mode:
    refused by default, and with ``custom_functions="forward"`` its forward is differentiated
    (its backward is that derivative: the first call checks it). Its attention's softmax in
    ``dtype=torch.float32`` of float64 scores hands its cotangent back in float64 (before: a
    dtype error in the next product); that float32 softmax sets the tolerance."""
    if not hasattr(transformers, "BloomForSequenceClassification"):
        pytest.skip(f"transformers {transformers.__version__} has no Bloom")
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=8, n_layer=1, n_head=2,
                                      hidden_dropout=0.0, attention_dropout=0.0, num_labels=3,
                                      pad_token_id=0)
    model = Call(transformers.BloomForSequenceClassification(config)).to(DTYPE).train()
    _spread(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(1, VOCAB, (N, T), generator=gen), torch.tensor([0, 2, 1])[:N]
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(fxcurv.CompileError, match="GeLUFunction.*custom_functions='forward'"):
        fxcurv.compile(model, loss_fn, ["batch_grad"], example=(x, y))
    step = fxcurv.compile(model, loss_fn, ["batch_grad", "kfac"], example=(x, y),
                          custom_functions="forward")
    assert_first_order_and_kfac(model, loss_fn, x, y, *step(x, y), dict(rtol=1e-6, atol=1e-7))


def test_the_gpt2_step_scripts_with_the_same_outputs():
    """The generated code of a Hugging Face step (its branch check included) runs under
    TorchScript. (``torch.export`` of it also matches: 16 s here, so checked outside the
    suite; ``test_merged_rows.py`` exports a merged-rows step.)"""
    _, _, ids, y = prepared("gpt2")
    step, (loss, grad, batch_grad, diag_ggn, _) = compiled("gpt2")
    loss_again, grad_again, batch_grad_again, diag_ggn_again, _ = torch.jit.script(step)(ids, y)
    torch.testing.assert_close(loss_again, loss, **TOL)
    torch.testing.assert_close(batch_grad_again, batch_grad, **TOL)
    torch.testing.assert_close(diag_ggn_again, diag_ggn, **TOL)
