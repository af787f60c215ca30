"""ProCache's caching core: schedules, search, step clock, cache store, token selection, engine.

Imports torch but nothing from ComfyUI, so it runs and is tested on its own.
"""
from .cache import CacheStore
from .clock import StepClock
from .engine import Run
from .families import find_family
from .policy import SchedulePolicy
from .schedule import Schedule, ScheduleError, StepKind, inject_selective, parse_pattern, uniform
from .forecast import ForecastError, ForecastFitter, Taylor
from .search import SearchConstraints, SearchResult, draw_candidates, generic_pattern, search
from .stats import RunStats
from .tokens import TokenSelector

__all__ = ["CacheStore", "StepClock", "Run", "find_family", "SchedulePolicy", "Schedule", "ScheduleError",
           "StepKind", "inject_selective", "parse_pattern", "uniform", "SearchConstraints", "SearchResult",
           "draw_candidates", "generic_pattern", "search", "ForecastError", "ForecastFitter", "Taylor", "RunStats",
           "TokenSelector"]
