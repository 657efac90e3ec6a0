"""What a parallel worker's symbolic side found, as plain data for the coordinator.

z3 expressions do not pickle, and the coordinator needs only what the exports print: each
state's path condition (sent as its readable text, the form the graph carries), its witness
(the smallest input seen reaching it, as in one process), the variables, and the incomplete
reports. The coordinator's driver takes the union (:func:`absorb`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emu.symbolic.text import path_condition

if TYPE_CHECKING:
    from emu.symbolic.driver import Driver


def export(driver: Driver) -> dict[str, Any]:
    """A worker's findings (picklable)."""
    cache: dict[int, str] = {}
    conditions = {
        d: path_condition([s.cond for s in pc], cache)
        for d, pc in driver.conditions.items()
        if driver.witnesses.get(d)  # only these are annotated (Driver.annotate)
    }
    return {
        "conditions": conditions,
        "witnesses": dict(driver.witnesses),
        "variables": dict(driver.var_info),
        "reports": dict(driver.reports),
        "spent": driver.spent,
        "queries": driver.queries,
    }


def absorb(driver: Driver, part: dict[str, Any]) -> None:
    """A worker's findings into the coordinator's driver (a union: the order does not matter)."""
    for d, text in part["conditions"].items():
        if d not in driver.conditions:
            driver.texts.setdefault(d, text)
    for d, w in part["witnesses"].items():
        old = driver.witnesses.get(d)
        if old is None or w < old:
            driver.witnesses[d] = w
    for name, var in part["variables"].items():
        driver.var_info.setdefault(name, var)
    for key, kind in part["reports"].items():
        driver.reports.setdefault(key, kind)
    driver.spent += part["spent"]
    driver.queries += part["queries"]
