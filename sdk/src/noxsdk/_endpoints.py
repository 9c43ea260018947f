"""The methods both clients have, each written once.

An :class:`Endpoint` wraps a builder of :mod:`noxsdk._routes`. Read from a client, it is a
method with the builder's parameters and docstring that builds the call and hands it to the
client's ``_execute``: :class:`~noxsdk.NoxClient` returns the result,
:class:`~noxsdk.AsyncNoxClient` a coroutine of it. Type checkers see both (``__get__``
overloads), so no method is written twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from noxsdk import _routes as routes
from noxsdk._routes import Call

if TYPE_CHECKING:
    from noxsdk.aio import AsyncNoxClient
    from noxsdk.client import NoxClient

__all__ = ["Endpoint", "Endpoints"]

P = ParamSpec("P")
T = TypeVar("T")


class Endpoint(Generic[P, T]):
    """A client method made from a call builder."""

    def __init__(self, build: Callable[P, Call[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, client: None, owner: type) -> Endpoint[P, T]: ...

    @overload
    def __get__(self, client: NoxClient, owner: type) -> Callable[P, T]: ...

    @overload
    def __get__(
        self, client: AsyncNoxClient, owner: type
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        build = self._build
        execute = client._execute

        @functools.wraps(build)
        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return execute(build(*args, **kwargs))

        return method

    def __call__(self, client: Any, /, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Called on the class, as ``NoxClient.me(client)``, like a plain method."""
        return client._execute(self._build(*args, **kwargs))


class Endpoints:
    """Every route that answers one result; streaming methods are the clients' own."""

    health = Endpoint(routes.health)
    health_detailed = Endpoint(routes.health_detailed)
    me = Endpoint(routes.me)

    run_py = Endpoint(routes.run_py)
    run_sh = Endpoint(routes.run_sh)

    put = Endpoint(routes.put)
    list_files = Endpoint(routes.list_files)
    read_file = Endpoint(routes.read_file)
    write_file = Endpoint(routes.write_file)
    delete_file = Endpoint(routes.delete_file)
    search_files = Endpoint(routes.search_files)

    history = Endpoint(routes.history)
    execution = Endpoint(routes.execution)
    stats = Endpoint(routes.stats)
    resources = Endpoint(routes.resources)

    create_token = Endpoint(routes.create_token)
    list_tokens = Endpoint(routes.list_tokens)
    revoke_token = Endpoint(routes.revoke_token)

    audit = Endpoint(routes.audit)
    verify_audit = Endpoint(routes.verify_audit)
    policy = Endpoint(routes.policy)
    reload_policy = Endpoint(routes.reload_policy)

    create_backup = Endpoint(routes.create_backup)
    list_backups = Endpoint(routes.list_backups)
    restore_backup = Endpoint(routes.restore_backup)

    clean = Endpoint(routes.clean)
    logs = Endpoint(routes.logs)
