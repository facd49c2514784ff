"""Learned placeholder words (Gal et al. 2022, §4): the only trainable tensor, its init, and its files.

The frozen token table is never copied or resized: a placeholder gets new ids ≥ the vocabulary size
(`tokenizer.add_placeholder`) and its rows live in one fp32 `(rows, width)` parameter passed to
`model.token_embeddings(ids, extra=param)`. A multi-vector word expands to its k consecutive ids in
the prompt, which splices k vectors in place of the word as the official EmbeddingManager does.

Files (all written atomically: temp file + fsync + os.replace):
  official   `embeddings.pt`              {"string_to_token": {tok: tensor(id)}, "string_to_param": {tok: (n, w)}}
  diffusers  `learned_embeds.safetensors` {tok: (n, w)}   (multi-vector loads as tok, tok_1, … in diffusers)
  A1111      `<name>.pt`                  {"string_to_token": {"*": 265}, "string_to_param": {"*": (n, w)},
                                           "name": tok, "step", "sd_checkpoint", "sd_checkpoint_name"}
`load_embedding_file` reads those three plus kohya's {"emb_params": (n, w)}.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ldm.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "InversionError",
    "WIDTH_FAMILIES",
    "LearnedWords",
    "load_embedding_file",
    "check_width",
    "save_embedding_files",
    "atomic_write",
    "file_stem",
    "official_dict",
    "diffusers_dict",
    "a1111_dict",
]

WIDTH_FAMILIES = {768: "SD1.x, CLIP ViT-L/14", 1024: "SD2.x, OpenCLIP ViT-H/14", 1280: "LDM-1.4B BERT or SDXL clip_g"}
A1111_TOKEN = {"*": 265}  # what AUTOMATIC1111 (and the official '*' placeholder) store
PER_IMAGE_TOKEN = "{token}-img{index}"


class InversionError(UserError):
    """Bad input or an impossible request, shown to the user as one line (`error: …`, exit 2)."""


def _family(width: int) -> str:
    return WIDTH_FAMILIES.get(width, "no known model family")


def model_width(model) -> int:
    """Width of the text tower's token table."""
    return int(model.text_encoder.token_embedding.weight.shape[1])


def check_width(vectors: torch.Tensor, model, source: str = "embedding") -> None:
    """One-line error when learned vectors do not fit the model's token width (768 SD1, 1024 SD2, 1280 LDM)."""
    have, want = int(vectors.shape[-1]), model if isinstance(model, int) else model_width(model)
    if have != want:
        raise InversionError(
            f"{source} is {have} wide ({_family(have)}) but this model's text encoder is "
            f"{want} wide ({_family(want)}); use an embedding trained for this model family"
        )


# --- one-token words and init ------------------------------------------------------------------------------


def word_id(tokenizer, word: str, what: str = "init word") -> int:
    """The single id of `word`; a word of several tokens is an error that suggests single-token pieces."""
    ids = tokenizer.encode(word)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise InversionError(f"{what} {word!r} encodes to no token; give a real word such as 'cat'")
    pieces = [tokenizer.decode([i]) for i in ids]
    singles = [p for p in dict.fromkeys(pieces) if p and len(tokenizer.encode(p)) == 1]
    hint = f"try one of {', '.join(repr(p) for p in singles)}" if singles else "try a simpler word"
    raise InversionError(
        f"{what} {word!r} is {len(ids)} tokens ({' + '.join(pieces)}), it must be one token; "
        f"{hint}, or spread words over vectors with --init-words w1,w2"
    )


def check_placeholder(tokenizer, token: str) -> None:
    """A placeholder must not already be a vocabulary word (or contain whitespace)."""
    if not token or any(c.isspace() for c in token):
        raise InversionError(f"TOKEN={token!r} must be one word without spaces, e.g. '<my-concept>'")
    ids = tokenizer.encode(token)
    if len(ids) == 1 and ids[0] < tokenizer.vocab_size:
        raise InversionError(
            f"TOKEN={token!r} is already a vocabulary word; pick a new string such as '<{token.strip('<>')}>'"
        )
    if token in getattr(tokenizer, "placeholders", {}):
        raise InversionError(f"TOKEN={token!r} is already a learned word in this model; pick another")


def table_mean_norm(model) -> float:
    """Mean L2 norm of the frozen token table's rows (the scale for random init)."""
    table = model.text_encoder.token_embedding.weight.detach()
    return float(table.float().norm(dim=1).mean())


def init_vectors(
    model, num_vectors: int, init_words: list[str] | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(num_vectors, width) fp32 start: init word(s) spread over the vectors, else N(0, I) scaled to the mean norm."""
    table = model.text_encoder.token_embedding.weight.detach()
    width = table.shape[1]
    if init_words:
        ids = [word_id(model.tokenizer, w) for w in init_words]
        rows = table[torch.tensor(ids, device=table.device)].float().cpu()
        pick = [i * len(ids) // num_vectors for i in range(num_vectors)]  # word k covers an even share
        return rows[pick].clone()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    v = torch.randn(num_vectors, width, generator=g, dtype=torch.float32)
    return v / v.norm(dim=1, keepdim=True) * table_mean_norm(model)


class LearnedWords(nn.Module):
    """Placeholder tokens and their rows: one fp32 parameter (rows, width), row j ↔ id vocab_size + j."""

    def __init__(
        self,
        model,
        token: str,
        num_vectors: int = 1,
        init_words: list[str] | None = None,
        per_image: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        tok = model.tokenizer
        check_placeholder(tok, token)
        if num_vectors < 1:
            raise InversionError(f"VECTORS={num_vectors} must be at least 1")
        vocab = tok.vocab_size
        if len(tok) != vocab:
            raise InversionError("the model already holds learned words; train on a fresh model")
        main = init_vectors(model, num_vectors, init_words, generator)
        self.token, self.num_vectors = token, num_vectors
        self.tokens: dict[str, list[int]] = {token: tok.add_placeholder(token, num_vectors)}
        self.image_tokens = [PER_IMAGE_TOKEN.format(token=token, index=i) for i in range(per_image)]
        rows = [main]
        for name in self.image_tokens:
            self.tokens[name] = tok.add_placeholder(name, 1)
            rows.append(init_vectors(model, 1, None, generator))
        self.first_id = vocab
        ids = [i for v in self.tokens.values() for i in v]
        if ids != list(range(vocab, vocab + len(ids))):
            raise RuntimeError(f"placeholder ids {ids} are not consecutive from {vocab}")
        init = torch.cat(rows).to(model.text_encoder.token_embedding.weight.device)
        self.vectors = nn.Parameter(init.clone())  # fp32 whatever the model's dtype
        self.register_buffer("initial", init.clone(), persistent=False)

    def rows_of(self, token: str) -> torch.Tensor:
        ids = self.tokens[token]
        return self.vectors[ids[0] - self.first_id : ids[-1] + 1 - self.first_id]

    def reg_loss(self) -> torch.Tensor:
        """Official embedding_to_coarse_loss: mean of (v − v₀)(v − v₀)ᵀ for the initialised word."""
        d = self.rows_of(self.token) - self.initial[: self.num_vectors]
        return (d @ d.T).mean()

    def unused_ids(self, active: int) -> set[int]:
        """Ids of the main word beyond the first `active` vectors (progressive words)."""
        return set(self.tokens[self.token][active:])

    def words(self) -> dict[str, torch.Tensor]:
        """{token: (n, width)} fp32 CPU copies of every learned word."""
        return {t: self.rows_of(t).detach().float().cpu().clone() for t in self.tokens}


# --- file formats ------------------------------------------------------------------------------------------


def file_stem(token: str) -> str:
    """A file-system-safe name for a token: '<cat toy>' → 'cat-toy'."""
    stem = re.sub(r"[^0-9A-Za-z._-]+", "-", token).strip("-.")
    return stem or "embedding"


def official_dict(words: dict[str, torch.Tensor], ids: dict[str, list[int]]) -> dict:
    """The official EmbeddingManager.save layout (plain dicts so it loads with weights_only=True)."""
    return {
        "string_to_token": {t: torch.tensor(ids[t][0]) for t in words},
        "string_to_param": {t: v.contiguous() for t, v in words.items()},
    }


def diffusers_dict(token: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """diffusers' learned_embeds layout: one key, (n, width)."""
    return {token: vectors.contiguous()}


def a1111_dict(
    token: str, vectors: torch.Tensor, step: int, checkpoint_hash: str | None, checkpoint_name: str | None
) -> dict:
    """AUTOMATIC1111's Embedding.save layout; `name` carries our token so diffusers loads it under it."""
    return {
        "string_to_token": dict(A1111_TOKEN),
        "string_to_param": {"*": vectors.contiguous()},
        "name": token,
        "step": step,
        "sd_checkpoint": checkpoint_hash,
        "sd_checkpoint_name": checkpoint_name,
    }


def _replace(src: str, dst: Path) -> None:
    os.replace(src, dst)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write through a temp file in the same folder, fsync, then rename: readers see old or new, never half.

    An OSError (disk full, file too large, read-only) leaves the previous file untouched and is re-raised
    naming `path`, so the command line prints one line such as `error: cannot write …: No space left on device`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, f"{e.strerror or e}; the previous file is unchanged", str(path)) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_torch(obj, path: str | os.PathLike) -> Path:
    """torch.save, serialised in memory first so that a full disk is an OSError, not torch's RuntimeError."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda f: f.write(buf.getbuffer()))


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))


def save_embedding_files(
    folder: str | os.PathLike,
    words: LearnedWords,
    step: int,
    checkpoint_hash: str | None = None,
    checkpoint_name: str | None = None,
    suffix: str = "",
) -> list[Path]:
    """Write the official, diffusers and A1111 files of `words` into `folder` (names + suffix)."""
    folder = Path(folder)
    all_words = words.words()
    main = all_words[words.token]
    return [
        save_torch(official_dict(all_words, words.tokens), folder / f"embeddings{suffix}.pt"),
        save_safetensors(diffusers_dict(words.token, main), folder / f"learned_embeds{suffix}.safetensors"),
        save_torch(
            a1111_dict(words.token, main, step, checkpoint_hash, checkpoint_name),
            folder / f"{file_stem(words.token)}{suffix}.pt",
        ),
    ]


MAX_VECTORS = 75  # a word must leave room for BOS/EOS in a 77-token prompt


def _as_rows(name: str, value, path: Path) -> torch.Tensor:
    """One word's (vectors, width) fp32 rows; anything else (ints, NaN/inf, empty, 3-D …) is refused by name."""
    if isinstance(value, nn.Parameter):
        value = value.data
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or not value.is_floating_point():
        what = (
            f"a {value.ndim}-D {str(value.dtype).removeprefix('torch.')} tensor"
            if isinstance(value, torch.Tensor)
            else f"a {type(value).__name__}"
        )
        raise InversionError(f"{path}: entry {str(name)[:80]!r} is {what}, not a (vectors, width) float tensor")
    rows = value.detach().reshape(-1, value.shape[-1]) if value.shape[-1] else value.detach().reshape(0, 0)
    if rows.numel() == 0:
        raise InversionError(f"{path}: entry {str(name)[:80]!r} is empty (shape {tuple(value.shape)})")
    if rows.shape[0] > MAX_VECTORS:
        raise InversionError(
            f"{path}: entry {str(name)[:80]!r} has {rows.shape[0]} vectors; a word can have at "
            f"most {MAX_VECTORS} (is it a whole token table rather than an embedding?)"
        )
    rows = rows.float().cpu().clone()
    if not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows)).sum())
        raise InversionError(
            f"{path}: entry {str(name)[:80]!r} holds {bad} NaN/inf value(s); the training that "
            "wrote it diverged — use an earlier file from its steps/ folder"
        )
    return rows


def _word_name(name, path: Path) -> str:
    """A word's name from a file: a non-empty string without whitespace (it becomes a placeholder token)."""
    if not isinstance(name, str | int) or isinstance(name, bool):
        raise InversionError(f"{path}: a word name is a {type(name).__name__}, not a string")
    name = str(name)
    if not name or any(c.isspace() for c in name) or len(name) > 200:
        raise InversionError(
            f"{path}: word name {name[:80]!r} must be one non-empty word without spaces; give TOKEN= to name it"
        )
    return name


def _read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([nn.ParameterDict, nn.Parameter]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors come in many classes
        raise InversionError(f"{path}: not a readable embedding file ({load_failure(e)})") from None


def load_failure(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words: the pickled global it would have had
    to run (which it did not), else the error's first line."""
    text = str(e).strip()
    culprit = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if culprit:
        return f"it holds pickled Python code ({culprit.group(1)}), which was not run"
    return text.splitlines()[0][:200] if text else type(e).__name__


def _words_of(data, path: Path, token: str | None) -> dict[str, torch.Tensor]:
    """{word: rows} from a loaded file in any of the known layouts (names are checked unless TOKEN= renames)."""

    def _name(key) -> str:
        return _word_name(key, path) if token is None else str(key)[:200]

    if isinstance(data, torch.Tensor):
        if token is None:
            raise InversionError(f"{path} holds a bare tensor with no word; give TOKEN=")
        return {token: _as_rows(token, data, path)}
    if not isinstance(data, dict) or not data:
        raise InversionError(f"{path}: not an embedding file (expected a dict of tensors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or not params:
            raise InversionError(f"{path}: string_to_param is a {type(params).__name__}, not a dict of tensors")
        if "name" in data and set(params) == {"*"}:  # AUTOMATIC1111
            name = token or _word_name(data["name"], path)
            return {name: _as_rows("*", params["*"], path)}
        return {_name(k): _as_rows(k, v, path) for k, v in params.items()}  # official EmbeddingManager
    if "emb_params" in data:  # kohya sd-scripts
        return {token or _word_name(path.stem, path): _as_rows("emb_params", data["emb_params"], path)}
    if "clip_l" in data or "clip_g" in data:
        raise InversionError(f"{path} is an SDXL embedding (clip_l/clip_g); this tool runs SD1/SD2/LDM models")
    words: dict[str, torch.Tensor] = {}  # diffusers, maybe tok, tok_1, … in one file
    for key in sorted(data, key=lambda k: (len(str(k)), str(k))):
        name = _name(key)
        m = re.fullmatch(r"(.+)_(\d+)", name)
        if m and m.group(1) in words and int(m.group(2)) == words[m.group(1)].shape[0]:
            words[m.group(1)] = torch.cat([words[m.group(1)], _as_rows(key, data[key], path)])
        else:
            words[name] = _as_rows(key, data[key], path)
    return words


def load_embedding_file(path: str | os.PathLike, token: str | None = None) -> dict[str, torch.Tensor]:
    """{word: (n, width) fp32} from an official, diffusers (incl. tok, tok_1 …), A1111 or kohya file."""
    path = Path(path)
    if not path.is_file():
        raise InversionError(f"embedding file {path} does not exist")
    try:
        data = _read(path)
    except InversionError:
        raise
    except Exception as e:
        raise InversionError(f"{path}: not a readable embedding file ({type(e).__name__}: {e})") from None
    try:
        words = _words_of(data, path, token)
    except InversionError:
        raise
    except Exception as e:  # a structure no known format has: say so in one line, never a traceback
        raise InversionError(f"{path}: not an embedding file in a known layout ({type(e).__name__})") from None
    if not words:
        raise InversionError(f"{path}: holds no words")
    widths = {v.shape[1] for v in words.values()}
    if len(widths) > 1:
        raise InversionError(f"{path}: words of different widths {sorted(widths)}")
    if token is not None:
        if len(words) != 1:
            raise InversionError(
                f"{path} holds {len(words)} words ({', '.join(repr(w) for w in list(words)[:5])}); TOKEN= needs one"
            )
        words = {token: next(iter(words.values()))}
    return words
