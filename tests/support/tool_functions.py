"""Python functions the function-tool tests load by ``module:function``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Literal

from pydantic import BaseModel


class Address(BaseModel):
    city: str
    zip: str | None = None


def forecast(city: str, days: int = 3, unit: Literal["C", "F"] = "C") -> dict[str, object]:
    """Forecast the weather for a city."""
    return {"city": city, "days": days, "unit": unit, "thread": threading.current_thread().name}


async def geocode(address: Address) -> Address:
    """Normalise an address."""
    await asyncio.sleep(0)
    return Address(city=address.city.title(), zip=address.zip)


def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "awake"


async def sleepy_async(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "awake"


def broken(reason: str) -> None:
    raise RuntimeError(reason)


def exits() -> None:
    raise SystemExit(3)


def variadic(*names: str) -> str:
    return ",".join(names)


def untyped(value):  # type: ignore[no-untyped-def]  # a parameter without annotation: Any
    return value


NOT_A_FUNCTION = 42
