"""Download public checkpoints over HTTPS: resume with HTTP Range, progress bar, sha256, atomic rename.

`python -m weights.download sd15` (or `make weights MODEL=sd15`).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent
MANIFEST = WEIGHTS_DIR / "manifest.json"
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that could not be completed or verified."""


def manifest() -> dict[str, dict]:
    """Known models: name → {file, url, sha256, size, family}."""
    return json.loads(MANIFEST.read_text())


def known_models() -> list[str]:
    return sorted(manifest())


def local_path(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Where model `name` lives once downloaded."""
    entries = manifest()
    if name not in entries:
        raise DownloadError(f"unknown model {name!r}; known: {', '.join(sorted(entries))}")
    return inside(weights_dir, entries[name]["file"])


def inside(folder: Path, name: str) -> Path:
    """folder/name, refusing a name that would leave the folder (absolute, `..`, a link out of it)."""
    path = Path(folder) / name
    if (
        Path(name).is_absolute()
        or ".." in Path(name).parts
        or not path.resolve().is_relative_to(Path(folder).resolve())
    ):
        raise DownloadError(f"manifest file name {name!r} would write outside {folder}")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    url: str, dest: Path, sha256: str | None, size: int | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download url to dest, resuming a `.part` file with an HTTP Range request; verify sha256, then rename."""
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            log.info("%s is already here and verified", dest)
            return dest
        raise DownloadError(f"{dest} exists but its sha256 does not match the manifest; move it away and retry")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "oneword"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file is already complete
            response = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            if have and not resumed:
                log.info("server ignored the Range request; starting %s again", dest.name)
                have = 0
            length = response.headers.get("Content-Length")
            total = (have + int(length)) if length is not None else size
            with (
                open(part, "ab" if resumed else "wb") as out,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
            ):
                try:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"{url}: transfer broke off ({e}); run again to resume") from None
            if total is not None and part.stat().st_size < total:
                raise DownloadError(
                    f"{url}: transfer broke off after {part.stat().st_size} of {total} bytes; run again to resume"
                )
    digest = sha256_of(part)
    if sha256 is None:
        log.warning(
            "%s has no published sha256; its sha256 is %s — compare it with a trusted source", dest.name, digest
        )
    elif digest != sha256:
        part.unlink()
        raise DownloadError(
            f"{dest.name}: sha256 {digest[:12]}… does not match the manifest's "
            f"{sha256[:12]}…; the partial file was deleted, run again"
        )
    os.replace(part, dest)
    return dest


def download(name: str, weights_dir: Path = WEIGHTS_DIR, progress: bool = True, unverified: bool = False) -> Path:
    """Download the manifest's model `name` (and its companion files) into weights_dir, resumable and verified.

    Entries without a published sha256 are refused unless `unverified` is set."""
    entries = manifest()
    entry = entries.get(name)
    if entry is None:
        raise DownloadError(f"unknown model {name!r}; known: {', '.join(known_models())}")
    for other in entry.get("companions", []):
        download(other, weights_dir, progress, unverified)
    if entry["sha256"] is None and not unverified:
        raise DownloadError(
            f"{name} has no published sha256, so it cannot be verified; add --unverified "
            "(make weights ... UNVERIFIED=1) to download it anyway and print its sha256"
        )
    if not str(entry["url"]).startswith("https://"):
        raise DownloadError(f"{name}: the manifest URL {entry['url']!r} is not https")
    return fetch(entry["url"], inside(weights_dir, entry["file"]), entry["sha256"], entry.get("size"), progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights.download", description=__doc__.splitlines()[0])
    parser.add_argument("model", help=f"one of: {', '.join(known_models())}")
    parser.add_argument("--dir", type=Path, default=WEIGHTS_DIR, help="destination folder")
    parser.add_argument("--unverified", action="store_true", help="allow files without a published sha256")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = download(args.model, args.dir, unverified=args.unverified)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    verified = manifest()[args.model]["sha256"] is not None
    print(f"ok: {path}" + (" (sha256 verified)" if verified else " (no published sha256 to verify)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
