"""Target backends: the runtimes a target model runs on, as plugins.

A backend is registered through the ``register_backends`` hook as ``register(name, load)``, where
``load(spec, *, dtype, device)`` returns a target for the model ``spec`` (``None`` = the embedded default).
The built-in ``hf`` backend (transformers; :class:`specframe.target.Target`) is registered the same way.

What the engine needs of a target (the seam; see ``docs/reference/backends.md``):

* text: ``encode(text, chat=None)``, ``encode_messages(messages)``, ``decode(ids)``, ``has_chat_template``;
* model facts: ``name``, ``vocab_size``, ``max_context``, ``eos_token_ids``, ``sliding_window`` (or None),
  ``num_layers``, ``hidden_size``;
* :class:`Capabilities`: whether it verifies trees in one forward, whether it returns hidden states of
  chosen layers (``features``), and the largest tree it verifies at once;
* ``start(feature_layers)`` → a session with ``prefill(ids)``, ``verify(tree)`` (logits of every node, and
  the features when asked), ``keep(path, n)`` (the accepted path stays, every other node leaves the KV
  cache), ``rollback(n)``, ``truncate(length)`` and ``past`` (tokens in its cache);
* ``synchronize()``: wait for queued device work, so timings are real.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecframeError

DEFAULT_BACKEND = "hf"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond plain decoding."""

    tree_attention: bool = True  # verifies a whole tree in one forward (ancestor mask)
    features: bool = False  # returns hidden states of chosen layers with every forward
    max_tree_tokens: int | None = None  # the most tokens one verification may hold (None: no own limit)


def capabilities(target) -> Capabilities:
    """A target's declared capabilities (a target that declares none gets the defaults)."""
    return getattr(target, "capabilities", None) or Capabilities()


def require_features(target, who: str) -> None:
    """One clear error when ``who`` needs hidden-state features that ``target``'s backend does not give."""
    if not capabilities(target).features:
        backend = getattr(target, "backend", "?")
        raise SpecframeError(
            f"{who} needs the target's hidden states, which backend '{backend}' does not provide; "
            f"use a backend that does (e.g. --backend hf) or a drafter that needs none (e.g. --drafter ngram)"
        )


def load_target(spec: str | None = None, backend: str | None = None, *, registry=None, dtype="float32",
                device: str = "cpu"):
    """Load the target ``spec`` on ``backend`` (a name from ``register_backends``; default ``hf``)."""
    from .registry import Registry

    registry = registry or Registry()
    name = backend or DEFAULT_BACKEND
    load = registry.get("backend", name).factory
    try:
        target = load(spec, dtype=dtype, device=device)
    except SpecframeError:
        raise
    except Exception as err:  # noqa: BLE001
        plugin = registry.get("backend", name).plugin
        raise SpecframeError(f"backend '{name}' (plugin '{plugin}') failed to load target '{spec}': "
                             f"{type(err).__name__}: {err}") from err
    if getattr(target, "backend", None) is None:
        try:
            target.backend = name
        except AttributeError:
            pass
    return target
