"""A Hugging Face style forward that returns a key/value cache object by default (``use_cache=True``: a
DynamicCache, which torch.export cannot return) compiles: such calls run with ``use_cache=False``, one warning,
the logits and loss the module's. Before, every ``model(ids)`` call of a Hugging Face causal LM raised TraceError."""
import dataclasses
import warnings

import pytest
import torch

import sessa_compiler as sc
from sessa_compiler.errors import TraceError

pytestmark = pytest.mark.usefixtures("one_thread")


class DynamicCache:   # (named as Hugging Face's: what torch.export's message names)
    def __init__(self):
        self.keys = []


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids, labels=None, use_cache=True):
        h = self.proj(self.emb(input_ids))
        cache = None
        if use_cache:
            cache = DynamicCache()
            cache.keys.append(h)
        logits = self.head(torch.tanh(h))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return Output(logits=logits, loss=loss, past_key_values=cache)


@pytest.mark.parametrize("backend", ["eager", "tvm"])
def test_a_forward_returning_a_cache_object_by_default_compiles(backend):
    torch.manual_seed(0)
    m = TinyLM()
    c = sc.compile(m, backend=backend)
    ids = torch.randint(0, 50, (2, 7))
    with pytest.warns(UserWarning, match="use_cache=False"):
        out = c(ids, labels=ids)
    ref = m(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.past_key_values is None
    out.loss.backward()
    got = m.proj.weight.grad.clone()
    m.zero_grad()
    ref.loss.backward()
    torch.testing.assert_close(got, m.proj.weight.grad)
    ids = torch.randint(0, 50, (1, 3))   # later calls: no new warning, compiled
    out = c(ids)
    torch.testing.assert_close(out.logits, m(ids).logits)
    assert c.uncompiled_calls == 0


def test_use_cache_true_passed_by_the_caller_still_says_what_failed():
    torch.manual_seed(0)
    c = sc.compile(TinyLM(), backend="eager")
    with pytest.raises(TraceError, match="DynamicCache"):
        c(torch.randint(0, 50, (2, 7)), use_cache=True)


def test_the_warning_points_at_the_callers_line():
    torch.manual_seed(0)
    c = sc.compile(TinyLM(), backend="eager")
    with pytest.warns(UserWarning, match="use_cache=False") as caught:
        c(torch.randint(0, 50, (2, 7)))
    assert [w.filename for w in caught if "use_cache" in str(w.message)] == [__file__]


class CachePositionBranch(torch.nn.Module):
    """Hugging Face Mamba2: with use_cache (its default) the forward branches on the cache position's value."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids, use_cache=True):
        h = self.emb(input_ids)
        if use_cache:
            cache_position = torch.arange(input_ids.shape[1], device=input_ids.device)
            if cache_position[0] > 0:
                h = h * 2
        return self.head(h)


def test_a_branch_on_the_cache_position_by_default_compiles():
    torch.manual_seed(0)
    m = CachePositionBranch()
    c = sc.compile(m, backend="eager")
    ids = torch.randint(0, 50, (2, 7))
    with pytest.warns(UserWarning, match="use_cache=False"):
        out = c(ids)
    torch.testing.assert_close(out, m(ids))
    torch.testing.assert_close(c(ids[:, :3]), m(ids[:, :3]))
    assert c.uncompiled_calls == 0


class LayerDropWithCache(CachePositionBranch):
    """A branch on data that is not the cache's (LayerDrop in training): use_cache=False does not help, so that
    mode runs the module and nothing about the cache changes."""

    def forward(self, input_ids, use_cache=True):
        h = self.emb(input_ids)
        if self.training and torch.rand([]) < 0.5:
            h = h * 2
        return self.head(h), (h if use_cache else None)


def test_a_branch_on_other_data_keeps_use_cache():
    torch.manual_seed(0)
    m = LayerDropWithCache().train()
    c = sc.compile(m, backend="eager")
    ids = torch.randint(0, 50, (2, 7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c(ids)
    assert not [w for w in caught if "use_cache=False" in str(w.message)]
    m.eval()
    with torch.no_grad():
        logits, cache = c(ids)
    assert cache is not None   # the module's default, as traced in eval
    torch.testing.assert_close(logits, m(ids)[0])
