"""Methods callable both on the class (with a sandbox id) and on an instance.

``Sandbox.kill("sbx-id")`` and ``sandbox.kill()`` are the same operation; so are
``get_info`` and ``set_timeout``. ``dual_method`` binds the class-level function when looked
up on the class and the instance-level one when looked up on an instance.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class dual_method(Generic[F]):  # noqa: N801 - used like a builtin decorator
    def __init__(self, class_func: Callable[..., Any]) -> None:
        self._class_func = class_func
        self._instance_func: Optional[Callable[..., Any]] = None
        self.__doc__ = class_func.__doc__
        self.__name__ = getattr(class_func, "__name__", "method")

    def instance(self, func: Callable[..., Any]) -> "dual_method[F]":
        """Register the instance-level implementation."""
        self._instance_func = func
        if func.__doc__:
            self.__doc__ = func.__doc__
        return self

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self._class_func.__get__(objtype, objtype)  # classmethod-like binding
        assert self._instance_func is not None, f"{self.__name__} has no instance implementation"
        return self._instance_func.__get__(obj, objtype)
