"""Target backends: the runtimes a target model runs on, as plugins.

A backend is registered through the ``register_backends`` hook as ``register(name, load)``, where
``load(spec, *, dtype, device)`` returns a target for the model ``spec`` (``None`` = the embedded default).
The built-in ``hf`` backend (transformers; ``specframe/plugins/hf.py``) is registered the same way.

What the engine needs of a target (the seam; see ``docs/reference/backends.md``):

* text: ``encode(text, chat=None)``, ``encode_messages(messages)``, ``decode(ids)``, ``has_chat_template``;
* model facts: ``name``, ``vocab_size``, ``max_context``, ``eos_token_ids``, ``sliding_window`` (or None),
  ``num_layers``, ``hidden_size``, and ``shape`` (a :class:`ModelShape`: FLOPs and bytes of one verification,
  for the roofline cost model);
* :class:`Capabilities`: whether it verifies trees in one forward, whether it returns hidden states of
  chosen layers (``features``), and the largest tree it verifies at once;
* ``start(feature_layers)`` → a session with ``prefill(ids)``, ``verify(tree)`` (logits of every node, and
  the features when asked), ``keep(path, n)`` (the accepted path stays, every other node leaves the KV
  cache), ``rollback(n)``, ``truncate(length)`` and ``past`` (tokens in its cache);
* ``synchronize()``: wait for queued device work, so timings are real.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import SpecframeError

DEFAULT_BACKEND = "hf"
AUTO = "auto"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond plain decoding."""

    tree_attention: bool = True  # verifies a whole tree in one forward (ancestor mask)
    features: bool = False  # returns hidden states of chosen layers with every forward
    max_tree_tokens: int | None = None  # the most tokens one verification may hold (None: no own limit)
    # hidden states come with every forward at no extra cost (transformers); False where asking for them
    # adds host work to every forward (llama.cpp's eval callback): ``auto`` then picks no block drafter
    free_features: bool = True
    feature_note: str = ""  # what the features cost, in words, for ``auto``'s explanation


@dataclass(frozen=True)
class ModelShape:
    """FLOPs and bytes of one verification forward of a decoder-only transformer (n new tokens on top
    of c cached ones). ``bytes_per_param`` is what one weight costs to read: 4 for fp32, ≈ 0.6 for Q4_1."""

    layers: int
    hidden: int
    q_width: int  # heads × head_dim
    kv_width: int  # kv heads × head_dim
    intermediate: int
    vocab: int
    bytes_per_param: float = 4.0
    cache_bytes: float | None = None  # bytes of one cached key/value element (None: bytes_per_param)

    @classmethod
    def from_config(cls, config, bytes_per_param: float = 4.0) -> "ModelShape":
        """From a transformers config (or any object with its attribute names)."""
        cfg = getattr(config, "get_text_config", lambda: config)()
        get = lambda *names, default=None: next(  # noqa: E731
            (getattr(cfg, k) for k in names if getattr(cfg, k, None) is not None), default
        )
        h = int(get("hidden_size", "n_embd", "d_model"))
        heads = int(get("num_attention_heads", "n_head"))
        kv = int(get("num_key_value_heads", default=heads))
        hd = int(get("head_dim", default=h // heads))
        return cls(layers=int(get("num_hidden_layers", "n_layer")), hidden=h, q_width=heads * hd,
                   kv_width=kv * hd, intermediate=int(get("intermediate_size", "n_inner", default=4 * h)),
                   vocab=int(get("vocab_size")), bytes_per_param=float(bytes_per_param))

    def with_bytes(self, bytes_per_param: float) -> "ModelShape":
        return replace(self, bytes_per_param=float(bytes_per_param))

    @property
    def linear(self) -> int:
        """Weights of one layer's linear maps (q, k, v, o, gated MLP)."""
        h = self.hidden
        return h * self.q_width + 2 * h * self.kv_width + self.q_width * h + 3 * h * self.intermediate

    def flops(self, n: int, c: int) -> float:
        dense = 2.0 * n * (self.layers * self.linear + self.hidden * self.vocab)
        attention = 4.0 * self.layers * n * (c + n) * self.q_width
        return dense + attention

    def bytes(self, n: int, c: int) -> float:
        b = self.bytes_per_param
        cb = b if self.cache_bytes is None else self.cache_bytes
        weights = b * (self.layers * self.linear + self.hidden * self.vocab)
        kv = cb * self.layers * 2 * self.kv_width * (c + 2 * n)  # read past + new, write new
        acts = cb * n * self.hidden * self.layers * 8 + 4.0 * n * self.vocab
        return weights + kv + acts


def capabilities(target) -> Capabilities:
    """A target's declared capabilities (a target that declares none gets the defaults)."""
    return getattr(target, "capabilities", None) or Capabilities()


def describe_backend(target) -> dict:
    """The runtime a target runs on, for ``--json`` and logs: ``{"name", "settings"}`` (settings from the
    target's own ``settings()`` where it has one: file, mode, threads, context, ...) and, when ``--backend
    auto`` chose it, ``"auto"``: why."""
    settings = getattr(target, "settings", None)
    out = {"name": getattr(target, "backend", DEFAULT_BACKEND), "settings": dict(settings()) if callable(settings) else {}}
    if getattr(target, "backend_note", ""):
        out["auto"] = target.backend_note
    return out


def quiet_backends(registry=None) -> None:
    """Hide every registered backend's progress bars and warnings (for the command line): each backend
    loader that has a ``quiet()`` is called."""
    from .registry import Registry

    registry = registry or Registry()
    for name in registry.names("backend"):
        quiet = getattr(registry.get("backend", name).factory, "quiet", None)
        if callable(quiet):
            quiet()


def require_features(target, who: str) -> None:
    """One clear error when ``who`` needs hidden-state features that ``target``'s backend does not give."""
    if not capabilities(target).features:
        backend = getattr(target, "backend", "?")
        raise SpecframeError(
            f"{who} needs the target's hidden states, which backend '{backend}' does not provide; "
            f"use a backend that does (e.g. --backend hf) or a drafter that needs none (e.g. --drafter ngram)"
        )


def load_target(spec: str | None = None, backend: str | None = None, *, registry=None, dtype="float32",
                device: str = "cpu", options: dict | None = None):
    """Load the target ``spec`` on ``backend`` (a name from ``register_backends``; default ``hf``).
    ``options`` go to the backend's loader as keywords (e.g. ``{"mode": "fast"}`` for ``llama.cpp``)."""
    from .registry import Registry

    registry = registry or Registry()
    name, why = (backend, "") if backend not in (None, AUTO) else choose_backend(spec, device, registry, dtype)
    load = registry.get("backend", name).factory
    options = dict(options or {})
    if options:
        import inspect

        params = inspect.signature(load).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            known = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and k not in ("dtype", "device")]
            bad = sorted(set(options) - set(known))
            if bad:
                raise SpecframeError(f"backend '{name}' takes no option {', '.join(bad)}; "
                                     f"its options: {', '.join(known) or '(none)'}")
    try:
        target = load(spec, dtype=dtype, device=device, **options)
    except SpecframeError:
        raise
    except Exception as err:  # noqa: BLE001
        plugin = registry.get("backend", name).plugin
        raise SpecframeError(f"backend '{name}' (plugin '{plugin}') failed to load target '{spec}': "
                             f"{type(err).__name__}: {err}") from err
    for attr, value in (("backend", name), ("backend_note", why)):
        if attr == "backend" and getattr(target, "backend", None) is not None:
            continue
        try:
            setattr(target, attr, value)
        except AttributeError:
            pass
    return target


def choose_backend(spec: str | None, device: str = "cpu", registry=None, dtype="float32") -> tuple[str, str]:
    """The backend ``auto`` picks for ``spec``, and why: among registered backends whose loader says
    ``claims(spec, device, dtype) -> (ok, reason)`` is ok, the one with the highest ``auto_priority``;
    else ``hf``. The reason of the winner, or of the best refused claim (one that gave a reason) when
    ``hf`` is the fallback, comes back; the reason is empty when ``hf`` is simply the default."""
    from .registry import Registry

    registry = registry or Registry()
    best, best_priority, why, refused = DEFAULT_BACKEND, float("-inf"), "", []
    for name in registry.names("backend"):
        load = registry.get("backend", name).factory
        claims = getattr(load, "claims", None)
        if claims is None:
            continue
        priority = getattr(load, "auto_priority", 0)
        ok, reason = claims(spec, device, dtype)
        if ok and priority > best_priority:
            best, best_priority, why = name, priority, str(reason)
        elif not ok and reason:
            refused.append((priority, name, str(reason)))
    if not why and refused:
        _, name, reason = max(refused)
        why = f"not '{name}': {reason}"
    return best, why
