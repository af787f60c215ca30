"""The schedule library: bundled schedules in the pack's `schedules/` folder and the user's own
in ComfyUI's user directory (`<user>/procache/schedules`).

Schedules are looked up by listed name only: a name is never joined onto a path, so nothing
outside these folders can be read. Files are JSON; nothing is unpickled. The same rules serve the
user's other saved files (forecasters, routers, EOC priors: `pack_dir`, `saved_files`, `user_path`),
and `stored_result` reads back what a node kept in its own widget.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

from ..procache_core import Schedule, ScheduleError

log = logging.getLogger("procache")

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schedules")
MAX_FILE_BYTES = 1 << 20


def user_dir() -> str | None:
    try:
        import folder_paths
        return os.path.join(folder_paths.get_user_directory(), "procache", "schedules")
    except Exception:        # outside ComfyUI (tests of the library alone)
        return None


def _folders() -> list[tuple[str, str]]:
    folders = [("bundled", BUNDLED_DIR)]
    user = user_dir()
    if user:
        folders.append(("user", user))
    return folders


def inside(folder: str, path: str) -> bool:
    """Whether `path`, symlinks resolved, is a file in `folder` (a link pointing out is not)."""
    real_folder, real_path = os.path.realpath(folder), os.path.realpath(path)
    return os.path.dirname(real_path) == real_folder and os.path.isfile(real_path)


def pack_dir(kind: str) -> str | None:
    """`<user>/procache/<kind>`: the folder of the user's saved files of one kind (routers, priors...)."""
    folder = user_dir()
    return os.path.join(os.path.dirname(folder), kind) if folder else None


def saved_files(folder: str | None, suffix: str) -> dict[str, str]:
    """name -> path of the `suffix` files in `folder` (hidden files and links out of it not listed)."""
    if not folder or not os.path.isdir(folder):
        return {}
    return {entry[:-len(suffix)]: os.path.join(folder, entry) for entry in sorted(os.listdir(folder))
            if entry.endswith(suffix) and not entry.startswith(".") and inside(folder, os.path.join(folder, entry))}


def listing() -> dict[str, str]:
    """name -> file path, for every schedule file in the library folders (bundled first)."""
    found: dict[str, str] = {}
    for origin, folder in _folders():
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.endswith(".json") and inside(folder, path):
                name = entry[:-5] if origin == "bundled" else f"user/{entry[:-5]}"
                found.setdefault(name, path)
    return found


def load(name: str) -> Schedule:
    """The schedule listed as `name`; a clear error for anything else."""
    path = listing().get(name)
    if path is None:
        raise ScheduleError(f"no schedule named {name!r} in the library; "
                            f"available: {', '.join(sorted(listing())) or 'none'}")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)         # never more than the limit, whatever the file grew to
    if len(data) > MAX_FILE_BYTES:
        raise ScheduleError(f"schedule file {name!r} is larger than 1 MiB; not a schedule")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScheduleError(f"schedule file {name!r} is not UTF-8 text; schedules are JSON files") from None
    return Schedule.from_json(text, where=f"schedule {name!r}")


def safe_name(name: str) -> str:
    """`name` with everything but letters, digits, '-', '_' and '.' removed (no leading/trailing dot)."""
    return "".join(c for c in name if c.isalnum() or c in "-_.").strip(".")


def user_path(folder: str | None, name: str, suffix: str, what: str, error: type[Exception] = ScheduleError) -> str:
    """`<folder>/<name><suffix>` for a name the user typed (a plain file name, nothing else), with
    the folder created; `error` (naming `what`) for a bad name or no user directory."""
    if folder is None:
        raise error("ComfyUI's user directory is not available")
    check_name(name, what, error)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name + suffix)


def check_name(name: str, what: str, error: type[Exception] = ScheduleError) -> None:
    """`error` unless `name` is a plain file name (letters, digits, '-', '_', '.'; no leading dot)."""
    safe = safe_name(name)
    if not safe or safe != name:
        raise error(f"{what} names may use letters, digits, '-', '_' and '.', got {name!r}")


def stored_result(text: str, parse, settings: object, what: str, again: str):
    """What a node kept in its own text widget (the stored-results web extension fills it in), if it
    was made with these settings; None (and a log line saying why) when the node must compute it
    `again`. `parse(text)` gives (value, the settings it was made with) or raises ValueError."""
    if not text or not text.strip():
        return None
    try:
        value, made_with = parse(text)
    except ValueError as e:
        log.warning("ProCache: the %s text is unusable (%s); %s again", what, e, again)
        return None
    if made_with != settings:
        log.info("ProCache: settings changed since the %s was made; %s again", what, again)
        return None
    return value


def save_user(schedule: Schedule, name: str, extra: dict | None = None) -> str:
    """Write a schedule into the user's folder; the name is a plain file name, nothing else.
    `extra` adds top-level keys (e.g. the search metadata) that readers of the format ignore."""
    doc = schedule.to_dict()
    for key, value in (extra or {}).items():
        doc.setdefault(key, value)
    return save_user_file(user_dir(), name, ".json", json.dumps(doc, indent=1) + "\n", "schedule")


def save_user_file(folder: str | None, name: str, suffix: str, data: bytes | str, what: str,
                   error: type[Exception] = ScheduleError) -> str:
    """Write `data` as `<folder>/<name><suffix>` for a name the user typed; returns the path.
    Every file the pack saves for the user goes through here or `write_inside`."""
    path = user_path(folder, name, suffix, what, error)
    write_inside(folder, path, data, what, error)
    return path


def write_inside(folder: str, path: str, data: bytes | str, what: str, error: type[Exception] = ScheduleError) -> None:
    """Write `data` to `path`, a file directly in `folder`, never through a symbolic link.

    A link named like the file (dangling or not), or a link in place of the folder or its parent,
    could send the bytes anywhere on the disk: such a save is refused. The bytes go to a fresh
    hidden file in the folder first, which then replaces `path` by rename; a rename replaces a link
    that appeared meanwhile instead of following it, so nothing outside the folder is written.
    """
    for candidate in (os.path.dirname(folder), folder, path):
        if os.path.islink(candidate):
            raise error(f"cannot save the {what} as {path}: {candidate} is a symbolic link, and the pack writes "
                        f"only inside its own folder; delete the link, or choose another name")
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise error(f"cannot save the {what} as {path}: it resolves outside {folder}; choose another name")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        handle, temporary = tempfile.mkstemp(prefix=".saving-", suffix=".tmp", dir=folder)
    except OSError as e:
        raise error(f"cannot save the {what} in {folder}: {e.strerror or e}") from None
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
        os.chmod(temporary, 0o644)          # mkstemp makes 0600; saved files read like any other
        os.replace(temporary, path)
    except OSError as e:
        raise error(f"cannot save the {what} as {path}: {e.strerror or e}") from None
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def origin(name: str, schedule: Schedule) -> str:
    """One line saying where a library schedule comes from: searched (on which model), generic, or the paper's."""
    provenance = schedule.provenance.lower()
    if provenance.startswith("searched"):
        return f"library: {name} was searched on a model: {schedule.provenance}"
    if provenance.startswith("generic"):
        return f"library: {name} is generic (made by the constraint rule, not searched on any model)"
    if provenance.startswith("procache paper"):
        return f"library: {name} is the ProCache paper's released pattern for {schedule.family}"
    return f"library: {name}"
