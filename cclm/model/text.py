"""Text and fusion stacks built from an HF XLM-R-style encoder.

The encoder (pretrained from a hub name / local folder, or randomly initialised from a config) is cut into two
stacks by configuration: ``text_layers`` run on text alone, ``fusion_layers`` get cross-attention added and attend
to a memory (image tokens or the other language's text tokens). We reuse HF's own layer classes unchanged.

:func:`check_text_config` checks a user's ``model.text`` before anything is built: ``encoder`` fields against
XLMRobertaConfig, and that ``name_or_path`` / ``tokenizer`` can be loaded (a local folder, the Hugging Face cache, or
one request to the Hub, so that an offline machine gets an answer at once instead of retries).

Re-ranking pairs every query text with many memories and every memory with many query texts, so
:class:`FusionStack` can also run in two halves: what depends on one side only (:meth:`FusionStack.memory_kv`: the
memory's cross-attention keys and values in every layer; :meth:`FusionStack.query_prefix`: the first layer's
self-attention over the query) is computed once per item, and :meth:`FusionStack.forward_cached` finishes each
pair from those, optionally for the [CLS] position of the last layer only (all the ITM head reads). The halves use
the HF layers' own modules and weights; only the attention products are ours.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import XLMRobertaConfig, XLMRobertaModel
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaLayer

from cclm.config import ConfigError
from cclm.runtime.env import local_main_first

HUB_TIMEOUT_S = 10.0
LAUNCH_DOC = "docs/launch.md, 'Pretrained weights on a cluster'"
HTTP_CONNECTION_ERRORS = {"ConnectError", "ConnectTimeout", "TransportError", "TimeoutException"}


def token_limit(encoder_config) -> int:
    """The most tokens a text may have in an encoder (``XLMRobertaConfig``): XLM-R numbers positions from
    ``pad_token_id + 1``, so a table of P rows holds P - pad_token_id - 1 tokens (514 -> 512)."""
    return int(encoder_config.max_position_embeddings) - int(encoder_config.pad_token_id or 0) - 1


def check_text_config(text_cfg: Any, key: str = "model.text") -> None:
    """Fail naming the key when ``encoder`` has a field that XLMRobertaConfig lacks or a value it refuses, or
    when ``name_or_path`` or ``tokenizer`` is neither a local folder nor loadable from the Hub."""
    check_encoder_fields(dict(text_cfg.encoder), f"{key}.encoder")
    check_encoder_values(dict(text_cfg.encoder), f"{key}.encoder")
    if text_cfg.name_or_path:
        check_pretrained_source(text_cfg.name_or_path, f"{key}.name_or_path")
    if text_cfg.tokenizer and text_cfg.tokenizer != text_cfg.name_or_path:
        check_pretrained_source(text_cfg.tokenizer, f"{key}.tokenizer")


def encoder_fields() -> set[str]:
    """Every field an XLMRobertaConfig takes: its own and PretrainedConfig's arguments and serialised keys."""
    names = set(XLMRobertaConfig().to_dict()) | set(XLMRobertaConfig.attribute_map)
    for cls in XLMRobertaConfig.__mro__:
        if "__init__" in vars(cls) and cls is not object:
            parameters = inspect.signature(cls.__init__).parameters.values()
            names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names.discard("self")
    return names


def check_encoder_fields(encoder: dict[str, Any], key: str = "model.text.encoder") -> None:
    """HF configs store unknown keyword arguments as attributes nobody reads: a misspelt field would silently
    train with the default, so every field must be one XLMRobertaConfig knows."""
    known = encoder_fields()
    for name in encoder:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key '{key}.{name}': not a field of XLMRobertaConfig{hint}")


def check_encoder_values(encoder: dict[str, Any], key: str = "model.text.encoder") -> None:
    """The encoder's values as XLMRobertaConfig checks them (its fields are typed: ``hidden_size=abc`` fails);
    the first line of its error, naming the key."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        XLMRobertaConfig(**encoder)
    except (StrictDataclassError, TypeError, ValueError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        field = re.search(r"field '(\w+)'", lines[0])
        where = f"{key}.{field[1]}" if field else key
        cause = lines[-1].strip() if field else lines[0]
        cause = re.sub(r"^\w+: Field '\w+' ", "", cause).split(". Errors:")[0]  # the key is named already
        raise ConfigError(f"config key '{where}': {cause}") from None


def check_pretrained_source(name: str, key: str) -> None:
    """``name`` must be a local folder or a Hugging Face Hub repository that can be loaded now."""
    path = Path(name)
    if path.is_dir():
        return
    if path.exists():
        raise ConfigError(f"{key}={name!r}: a file, not a folder (give the folder that holds config.json)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, never a repository id
        raise ConfigError(f"{key}={name!r}: no such folder")
    if not loadable_from_hub(name):
        raise ConfigError(
            f"{key}={name!r}: not a local folder and not loadable from the Hugging Face Hub (offline?): "
            f"download it and give the folder path (`hf download {name} --local-dir DIR`; {LAUNCH_DOC})"
        )


def loadable_from_hub(
    repo_id: str, filenames: tuple[str, ...] = ("config.json", "tokenizer_config.json")
) -> bool:
    """True when one of ``filenames`` of ``repo_id`` is in the local Hugging Face cache, or the Hub answers for the
    repository (one request: loading it would retry for half a minute before failing offline)."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames):
            return True
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError as err:  # the Hub answered: no such repository or no access, unless it is busy
        status = getattr(getattr(err, "response", None), "status_code", None)
        return status is not None and (status == 429 or status >= 500)
    except Exception:  # offline, unreachable, not a valid repository id
        return False
    return True


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) says the files are neither in the Hugging Face cache nor reachable
    on the Hub: offline mode, no network, a cache miss without a connection."""
    from urllib.error import URLError

    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError, URLError)
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        # the HTTP client's own connection errors (whichever client huggingface_hub uses), by their class names
        names = {cls.__name__ for cls in type(cause).__mro__}
        if isinstance(cause, unreachable) or names & HTTP_CONNECTION_ERRORS:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def hf_download(repo_id: str, filename: str = "") -> str:
    """The command that puts ``repo_id`` (or one file of it) in the Hugging Face cache."""
    return f"`hf download {repo_id}{' ' + filename if filename else ''}` with the same HF_HOME"


def unavailable_message(key: str, value: str, download: str, local_form: str = "") -> str:
    """One line: what cannot be loaded, the command that downloads it, and the config that loads a local copy."""
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1" if hub_offline() else "the Hub cannot be reached"
    local = f" or {local_form}" if local_form else ""
    return (
        f"{key}={value!r}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: download it "
        f"where there is network ({download}){local} ({LAUNCH_DOC})"
    )


@contextlib.contextmanager
def fetching_pretrained(key: str, value: str, download: str, local_form: str = "") -> Iterator[None]:
    """Load pretrained files on each node's local rank 0 first (one download per node, then the other ranks read
    the cache: :func:`cclm.runtime.env.local_main_first`); a cache miss without the Hub becomes one
    ConfigError saying what to download (``download``: the command) and where to point the config
    (``local_form``), instead of a connection traceback."""
    with local_main_first():
        try:
            yield
        except Exception as err:
            if not hub_unreachable(err):
                raise
            raise ConfigError(unavailable_message(key, value, download, local_form)) from err


def load_encoder(
    name_or_path: str | None, overrides: dict[str, Any], attn_implementation: str
) -> XLMRobertaModel:
    """The full HF encoder, pretrained when a name/path is given, else random from ``overrides``."""
    if name_or_path:
        key = "model.text.name_or_path"
        check_encoder_fields(overrides)
        local_form = f"give a folder: `hf download {name_or_path} --local-dir DIR`, then {key}=DIR"
        with fetching_pretrained(key, name_or_path, hf_download(name_or_path), local_form):
            check_pretrained_source(name_or_path, key)
            return XLMRobertaModel.from_pretrained(
                name_or_path, add_pooling_layer=False, attn_implementation=attn_implementation, **overrides
            )
    config = XLMRobertaConfig(**overrides)
    config._attn_implementation = attn_implementation
    return XLMRobertaModel(config, add_pooling_layer=False)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, 1, 1, L] additive mask. Always passed explicitly: with HF's ``is_decoder`` layers
    and ``sdpa``, a missing mask would silently make the fusion self-attention causal."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class TextStack(nn.Module):
    """Word/position embeddings (XLM-R position ids start at padding_idx + 1) and the text-only layers."""

    def __init__(self, encoder: XLMRobertaModel, layer_ids: list[int]):
        super().__init__()
        self.config = encoder.config
        self.embeddings = encoder.embeddings
        self.layers = nn.ModuleList([encoder.encoder.layer[i] for i in layer_ids])
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        mask = additive_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            hidden = _run(layer, self.gradient_checkpointing and self.training, hidden, mask)
        return hidden


@dataclass
class MemoryKV:
    """What the fusion stack computes from memories alone: every layer's cross-attention keys and values
    ([n, heads, M, head_dim] each) and the additive memory mask [n, 1, 1, M].

    :meth:`select` picks rows (one per pair) without copying; :meth:`layer` gathers them for one layer at a
    time, so a batch of pairs never holds more than one layer's keys and values."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    rows: torch.Tensor | None = None  # None: every memory, in order

    def __len__(self) -> int:
        return self.mask.shape[0] if self.rows is None else len(self.rows)

    def select(self, rows: torch.Tensor) -> MemoryKV:
        """The memories at ``rows`` (repeats allowed: one row per pair)."""
        rows = rows if self.rows is None else self.rows[rows]
        return MemoryKV(self.keys, self.values, self.mask, rows)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, mask) of fusion layer ``i`` for the selected rows."""
        tensors = [self.keys[i], self.values[i], self.mask]
        return tuple(tensors) if self.rows is None else tuple(_rows(tensors, self.rows))


@dataclass
class QueryPrefix:
    """What the fusion stack computes from query texts alone: the first layer's self-attention output
    [n, L, H] (also the residual of its cross-attention), that layer's cross-attention queries
    [n, heads, L, head_dim], and the additive self-attention mask [n, 1, 1, L] of the later layers."""

    attended: torch.Tensor
    cross_queries: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]

    def select(self, rows: torch.Tensor, length: int | None = None) -> QueryPrefix:
        """The queries at ``rows`` (repeats allowed: one row per pair), cut to their first ``length`` positions
        (None: all; what lies beyond a query's own length is masked, so any length >= it gives its result)."""
        cut = [self.attended[:, :length], self.cross_queries[:, :, :length], self.mask[..., :length]]
        return QueryPrefix(*_rows(cut, rows))


def _rows(tensors: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
    # index_select: several times faster than advanced indexing for gathering whole rows on CPU
    return [t.index_select(0, rows) for t in tensors]


class FusionStack(nn.Module):
    """Layers with self-attention over the query text and cross-attention to a memory sequence.

    The memory can be image tokens or text tokens of another language; the layers do not know which.
    Self-attention, FFN and norms come from the pretrained layers; cross-attention is new (randomly
    initialised, listed by :meth:`new_parameter_names`).
    """

    def __init__(self, encoder: XLMRobertaModel, layer_ids: list[int]):
        super().__init__()
        config = copy.deepcopy(encoder.config)
        config.is_decoder = True
        config.add_cross_attention = True
        self.config = config
        self.layers = nn.ModuleList()
        for i in layer_ids:
            layer = XLMRobertaLayer(config, layer_idx=i)
            missing, unexpected = layer.load_state_dict(encoder.encoder.layer[i].state_dict(), strict=False)
            assert not unexpected and all(k.startswith("crossattention.") for k in missing), (
                missing,
                unexpected,
            )
            layer.crossattention.apply(encoder._init_weights)
            self.layers.append(layer)
        self.gradient_checkpointing = False

    def new_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if ".crossattention." in n]

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self_mask = additive_mask(attention_mask, hidden.dtype)
        # No mask at all for a memory without padding (image tokens): SDPA can then pick its flash kernel.
        cross_mask = None if memory_mask is None else additive_mask(memory_mask, hidden.dtype)
        for layer in self.layers:
            hidden = _run(
                layer, self.gradient_checkpointing and self.training, hidden, self_mask, memory, cross_mask
            )
        return hidden

    # ------------------------------------------------------------------------- re-ranking in two halves
    def memory_kv(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> MemoryKV:
        """Every layer's cross-attention keys and values of ``memory`` [n, M, H] (mask [n, M], None = all)."""
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        keys, values = [], []
        for layer in self.layers:
            attention = layer.crossattention.self
            keys.append(_split_heads(attention.key(memory), attention))
            values.append(_split_heads(attention.value(memory), attention))
        return MemoryKV(keys, values, additive_mask(memory_mask, memory.dtype))

    def query_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> QueryPrefix:
        """The first layer's work on the query text [n, L, H] (mask [n, L]) up to its cross-attention."""
        if not self.layers:
            raise ValueError("a fusion stack without layers has no cross-attention to prepare")
        mask = additive_mask(attention_mask, hidden.dtype)
        first = self.layers[0]
        attended = first.attention(hidden, attention_mask=mask)[0]
        cross_queries = _split_heads(first.crossattention.self.query(attended), first.crossattention.self)
        return QueryPrefix(attended, cross_queries, mask)

    def forward_cached(self, prefix: QueryPrefix, memory: MemoryKV, cls_only: bool = False) -> torch.Tensor:
        """:meth:`forward` of the pairs (``prefix`` row j, ``memory`` row j), from their precomputed halves.

        ``cls_only``: the last layer computes the first ([CLS]) position only ([B, 1, H]), all the ITM head
        reads; its self-attention still reads every position."""
        if len(prefix) != len(memory):
            raise ValueError(f"{len(prefix)} query rows for {len(memory)} memory rows")
        last = len(self.layers) - 1
        attended, cross_queries = prefix.attended, prefix.cross_queries  # layer 0's, from the prefix
        hidden = None
        for i, layer in enumerate(self.layers):
            cross = layer.crossattention
            cls_row_only = cls_only and i == last
            if i > 0:
                if cls_row_only:
                    attended = _cls_self_attention(layer, hidden, prefix.mask)
                else:
                    attended = layer.attention(hidden, attention_mask=prefix.mask)[0]
                cross_queries = _split_heads(cross.self.query(attended), cross.self)
            elif cls_row_only:  # a one-layer stack
                attended, cross_queries = attended[:, :1], cross_queries[:, :, :1]
            mixed = _attend(cross.self, cross_queries, *memory.layer(i))
            hidden = layer.feed_forward_chunk(cross.output(mixed, attended))
        return hidden


def _split_heads(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """[B, L, heads * head_dim] -> [B, heads, L, head_dim]."""
    return x.view(*x.shape[:-1], -1, attention.attention_head_size).transpose(1, 2)


def _attend(attention: nn.Module, queries, keys, values, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention with an HF attention module's scaling and dropout -> [B, L, H]."""
    dropout = attention.dropout.p if attention.training else 0.0
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, dropout_p=dropout, scale=attention.scaling
    )
    return out.transpose(1, 2).flatten(2)


def _cls_self_attention(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A layer's self-attention block (attention, output projection, residual norm) for the first ([CLS])
    position only, attending to every position of ``hidden`` [B, L, H] -> [B, 1, H].

    Keys and values are linear in the hidden states, so instead of projecting every position (2 x L x H x H per
    row) the [CLS] query is folded into the key weights and the attention-weighted hidden states go through
    the value weights once (2 x H x H). The key bias adds the same score to every position, which the softmax
    ignores; the weights sum to 1, so the value bias is added once."""
    attention = layer.attention.self
    heads, head_size = attention.num_attention_heads, attention.attention_head_size
    cls = hidden[:, :1]
    # Shapes: n heads of size d; the per-head weight products are batched over the heads.
    query = attention.query(cls[:, 0]).view(-1, heads, head_size).transpose(0, 1)  # [n, B, d]
    key_weight = attention.key.weight.view(heads, head_size, -1)  # [n, d, H]
    folded_query = torch.bmm(query, key_weight).transpose(0, 1)  # [B, n, H]
    # [B, n, L]: the folded query against every position's hidden state, plus the padding mask
    scores = torch.baddbmm(mask[:, 0], folded_query, hidden.transpose(1, 2), alpha=attention.scaling)
    weights = F.dropout(scores.softmax(dim=-1), attention.dropout.p, attention.training)
    mixed = torch.bmm(weights, hidden).transpose(0, 1)  # [n, B, H]
    value_weight = attention.value.weight.view(heads, head_size, -1)  # [n, d, H]
    values = torch.bmm(mixed, value_weight.transpose(1, 2)).transpose(0, 1)  # [B, n, d]
    values = values + attention.value.bias.view(heads, head_size)
    return layer.attention.output(values.reshape(-1, 1, heads * head_size), cls)


def _run(layer: nn.Module, checkpoint: bool, hidden, mask, memory=None, memory_mask=None) -> torch.Tensor:
    kwargs = (
        {} if memory is None else {"encoder_hidden_states": memory, "encoder_attention_mask": memory_mask}
    )
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(
            lambda h, m: layer(h, attention_mask=m, **kwargs), hidden, mask, use_reentrant=False
        )
    return layer(hidden, attention_mask=mask, **kwargs)
