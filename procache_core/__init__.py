"""ProCache's caching core: schedules, search, step clock, cache store, token selection, engine.

Imports torch but nothing from ComfyUI, so it runs and is tested on its own.
"""
from .cache import CacheStore
from .clock import StepClock
from .engine import Run
from .families import find_family
from .policy import SchedulePolicy
from .schedule import Schedule, ScheduleError, StepKind, inject_selective, parse_pattern, uniform
from .search import SearchConstraints, draw_candidates
from .stats import RunStats
from .tokens import TokenSelector

__all__ = ["CacheStore", "StepClock", "Run", "find_family", "SchedulePolicy", "Schedule", "ScheduleError",
           "StepKind", "inject_selective", "parse_pattern", "uniform", "SearchConstraints", "draw_candidates",
           "RunStats", "TokenSelector"]
