"""``python -m pdmd push --student DIR --repo OWNER/NAME [--private] [--dry-run]``: a student folder to the Hub.

The folder goes up with huggingface_hub's ``upload_folder``, its model card (README.md) written first with the
repository's id in the usage snippet. Only the student's own files go: never checkpoints, optimizer states or
pickles. ``--dry-run`` lists exactly what would go and touches nothing; without a token or a network it fails
at once with one line (exit 2) instead of retrying.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pdmd.students import StudentError
from pdmd.students.card import CARD, write_card
from pdmd.students.manifest import PICKLE_SUFFIXES, Manifest

# never published: training state (a run folder's checkpoints, optimizer states), pickles, hidden files
EXCLUDED = ["checkpoints/*", "**/checkpoints/*", "*optimizer*", ".*", "**/.*",
            *(f"*{suffix}" for suffix in sorted(PICKLE_SUFFIXES))]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="student folder (manifest.json + one LoRA per phase)")
    parser.add_argument("--repo", required=True, metavar="OWNER/NAME", help="Hub model repository (made if missing)")
    parser.add_argument("--private", action="store_true", help="make a new repository private")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would go, upload nothing")


def files_to_push(folder: Path) -> list[str]:
    """The student's files, relative to its folder, as upload_folder will send them (README.md included)."""
    from fnmatch import fnmatch

    relative = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    relative.add(CARD)
    return sorted(r for r in relative if not any(fnmatch(r, pattern) for pattern in EXCLUDED))


def hub_ready() -> str | None:
    """Why an upload cannot start now (no token, no network), or None."""
    from huggingface_hub import get_token

    from pdmd.teachers import _hub_resolves

    if not get_token():
        return "no Hugging Face token: run `hf auth login` or set HF_TOKEN"
    if not _hub_resolves():
        return "the Hub cannot be reached (no network)"
    return None


class PushError(ValueError):
    """Why a student cannot be pushed; one line."""


def check_push(folder: Path, repo: str) -> list[str]:
    """The files that would go; PushError for a bad repo id or a folder that is no student."""
    if not isinstance(repo, str) or not REPO_ID.match(repo):
        raise PushError(f"repository {str(repo)[:100]!r} must be OWNER/NAME")
    try:
        Manifest.read(folder)  # a student folder, checked before anything is written or sent
    except StudentError as err:
        raise PushError(str(err)) from None
    return files_to_push(folder)


def push_student(folder: Path, repo: str, private: bool = False) -> str:
    """Upload the student (its card first written for ``repo``); the commit's URL."""
    check_push(folder, repo)
    problem = hub_ready()
    if problem:
        raise PushError(problem)
    from huggingface_hub import HfApi

    write_card(folder, repo_id=repo)
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=EXCLUDED,
                                   commit_message="Upload phased student (pdmd push)")
    except Exception as err:  # HTTP errors, refused token, ...: one line saying what the Hub answered
        first = str(err).splitlines()[0] if str(err) else ""
        raise PushError(f"upload to {repo} failed: {type(err).__name__}: {first}") from None
    return getattr(commit, "commit_url", str(commit))


def run(args: argparse.Namespace) -> int:
    folder = Path(args.student)
    try:
        files = check_push(folder, args.repo)
        if args.dry_run:
            print(json.dumps({"repo": args.repo, "private": args.private, "files": files}, indent=1))
            return 0
        url = push_student(folder, args.repo, args.private)
    except PushError as err:
        print(f"python -m pdmd push: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"repo": args.repo, "url": url, "files": files}))
    return 0
