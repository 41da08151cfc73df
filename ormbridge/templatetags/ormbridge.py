"""``{% cached_as %}``: a template fragment cached until a row it depends on changes.

Like Django's ``{% cache %}`` tag (the same arguments after the first), with
the models or querysets the fragment reads in front::

    {% load ormbridge %}
    {% cached_as products 600 "product-list" request.GET.page %}
        {% for product in products %}...{% endfor %}
    {% endcached_as %}
"""

from __future__ import annotations

from typing import Any

from django import template
from django.db import models
from django.template.base import FilterExpression, NodeList, Parser, Token

from ormbridge import cache, compiled, keys
from ormbridge.loads import Uncacheable
from ormbridge.registry import label_of

__all__ = [
    "CachedAsNode",
    "do_cached_as",
    "register",
]

register = template.Library()


class CachedAsNode(template.Node):
    """A fragment whose rendering is cached against the models of its sources."""

    def __init__(
        self,
        nodelist: NodeList,
        sources: FilterExpression,
        timeout: FilterExpression,
        name: str,
        vary_on: list[FilterExpression],
    ) -> None:
        self.nodelist = nodelist
        self.sources = sources
        self.timeout = timeout
        self.name = name
        self.vary_on = vary_on

    def render(self, context: template.Context) -> str:
        sources = self.sources.resolve(context, ignore_failures=True)
        if sources is None:
            raise template.TemplateSyntaxError(
                f'"cached_as" tag got an unknown variable: {self.sources.token!r}'
            )
        if not isinstance(sources, list | tuple):
            sources = [sources]
        # A model in the context reaches the tag as an instance (templates call callables).
        sources = [type(s) if isinstance(s, models.Model) else s for s in sources]
        labels = cache.dependencies(*sources)
        timeout = self.timeout.resolve(context)
        if timeout is None:
            timeout = cache.default_timeout(labels)
        else:
            try:
                timeout = int(timeout)
            except (ValueError, TypeError):
                raise template.TemplateSyntaxError(
                    f'"cached_as" tag got a non-integer timeout value: {timeout!r}'
                ) from None
        vary_on = [variable.resolve(context) for variable in self.vary_on]
        for variable, value in zip(self.vary_on, vary_on, strict=True):
            try:
                keys.encode(value)
            except keys.Unkeyable as exc:
                raise template.TemplateSyntaxError(
                    f'"cached_as" tag: {variable.token!r} is a {type(value).__name__}, which '
                    f"has no exact key ({exc}); vary on the values it stands for."
                ) from None

        def render() -> str:
            return self.nodelist.render(context)

        try:
            parts = [_source_key(source) for source in sources]
        except Uncacheable as refused:
            return cache.uncached(refused, labels, render)
        return cache.read_through(
            ("fragment", self.name, parts, vary_on),
            labels,
            render,
            timeout,
            shape=f"fragment\0{self.name}",
        )


def _source_key(source: Any) -> object:
    """What a source stands for in the fragment's key: a model's label, a queryset's key
    (the same fragment over another queryset is another entry)."""
    if isinstance(source, models.QuerySet):
        query_key = compiled.compile_queryset(source)
        if query_key is None:
            raise Uncacheable(
                "fragment", f"a queryset of the fragment is not cached: {source.query!r}"
            )
        return ("queryset", query_key.digest)
    return ("model", label_of(source))


@register.tag("cached_as")
def do_cached_as(parser: Parser, token: Token) -> CachedAsNode:
    """Cache a fragment until a row of the models its sources read changes.

    Usage::

        {% cached_as sources timeout name [var1 var2 ...] %}...{% endcached_as %}

    ``sources``: a queryset, a model (or an instance: its model), or a list of
    them (a variable);
    ``timeout``: seconds, or ``None`` for the shortest of the models' cache
    timeouts; ``name``: the fragment's name (quoted or not, not a variable);
    each distinct set of ``var`` values is an entry of its own.
    """
    nodelist = parser.parse(("endcached_as",))
    parser.delete_first_token()
    tokens = token.split_contents()
    if len(tokens) < 4:
        raise template.TemplateSyntaxError(
            f"'{tokens[0]}' tag requires at least 3 arguments: sources, timeout and a name."
        )
    name = tokens[3]
    if len(name) > 1 and name[0] == name[-1] and name[0] in "'\"":
        name = name[1:-1]
    return CachedAsNode(
        nodelist,
        parser.compile_filter(tokens[1]),
        parser.compile_filter(tokens[2]),
        name,
        [parser.compile_filter(t) for t in tokens[4:]],
    )
