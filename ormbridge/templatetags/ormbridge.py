"""``{% cached_as %}``: a template fragment cached until a row it depends on changes.

Like Django's ``{% cache %}`` tag (the same arguments after the first), with
the models or querysets the fragment reads in front::

    {% load ormbridge %}
    {% cached_as products 600 "product-list" request.GET.page %}
        {% for product in products %}...{% endfor %}
    {% endcached_as %}
"""

from __future__ import annotations

from django import template
from django.core.cache.utils import make_template_fragment_key
from django.db import models
from django.template.base import FilterExpression, NodeList, Parser, Token

from ormbridge import cache

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
        labels = cache.dependencies(
            *(type(s) if isinstance(s, models.Model) else s for s in sources)
        )
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
        key = make_template_fragment_key(self.name, vary_on)
        return cache.read_through(
            f"fragment\0{key}", labels, lambda: self.nodelist.render(context), timeout
        )


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
