"""PACE-ViT with global_pool='token': the last class-attention block's norm/MLP and the final norm run on the
class token only, with the same logits as the all-token path."""

import pytest
import timm
import torch

import pace  # noqa: F401  (registers the models)


def _model(**kw):
    return timm.create_model("pace_vit_test", img_size=32, num_classes=7, **kw)


@pytest.mark.parametrize("training", [False, True])
def test_class_token_path_gives_the_same_logits_and_gradients(training):
    model = _model(drop_path_rate=0.1).train(training)
    images = torch.randn(3, 3, 32, 32)
    results = []
    for fast in (True, False):
        torch.manual_seed(1)  # the same drop-path draws on both paths
        model.zero_grad()
        logits = model(images) if fast else model.forward_head(model.forward_features(images))
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_logits, fast_grads), (full_logits, full_grads) = results
    assert torch.equal(fast_logits, full_logits)  # per-token norm and MLP: bit-identical
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_final_norm_sees_only_the_class_token():
    model = _model().eval()
    shapes = []
    model.norm.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    last_norm2 = model.cls_attn_blocks[-1].norm2
    last_norm2.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert shapes == [(2, 1, model.embed_dim), (2, model.embed_dim)]
    shapes.clear()
    model.reset_classifier(7, global_pool="avg")  # every patch token is pooled: the full path runs
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert all(s[1] > 1 for s in shapes)
