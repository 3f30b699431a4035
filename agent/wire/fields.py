"""Bounded field types shared by the messages: what a device can claim, and no more."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["MAX_CALLS", "Count", "Id", "Latency", "Name", "Sum", "Text", "Timestamp"]

MAX_CALLS = 1_000_000_000  # answers in one telemetry window: ~11,000 a second for a whole day (the longest interval)
MAX_VALUES = 10**13  # output values summed in one window (calls x values per answer)

Count = Annotated[int, Field(ge=0, le=MAX_CALLS)]
BigCount = Annotated[int, Field(ge=0, le=MAX_VALUES)]
Latency = Annotated[float, Field(ge=0.0, le=3_600_000.0)]  # ms; an hour is not a latency
Sum = Annotated[float, Field(ge=-1e30, le=1e30)]
SumSq = Annotated[float, Field(ge=0.0, le=1e60)]
Timestamp = Annotated[float, Field(ge=0.0, le=1e11)]  # a claim only: the controller stamps its own receive time
Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Name = Annotated[str, Field(max_length=128)]
Text = Annotated[str, Field(max_length=1000)]
Code = Annotated[str, Field(pattern=r"^[a-z_]{1,32}$")]
