"""Tags are a JSON list of strings on each agent (and server). "Which agents have this tag" is
asked of the whole fleet at once (the API's and the pages' filters, a run's targets), so the
database answers it, in each database's own words, instead of Python reading every list."""

import json
from typing import Any

from django.db import NotSupportedError
from django.db.models import Lookup
from django.db.models.sql.compiler import SQLCompiler


class HasTag(Lookup):
    """`tags` contains `tag` exactly: `Agent.objects.filter(HasTag(F("tags"), "web"))`.

    PostgreSQL: jsonb containment (`tags @> '["web"]'`). SQLite: an EXISTS over `json_each`,
    which walks each row's short list in C. Neither needs an index at fleet size (10,000 rows
    filter in milliseconds), and an index on `tags` would be rewritten by every heartbeat on
    PostgreSQL (its updates are not HOT: `last_heartbeat` is indexed). Not a normalised tag
    table either: tags are written as one list, and a second copy would have to be kept in step
    with every write, bulk updates included."""

    lookup_name = "has_tag"
    prepare_rhs = False

    def as_sql(self, compiler: SQLCompiler, connection: Any) -> tuple[str, list[Any]]:
        raise NotSupportedError(f"The tag filter is not written for {connection.vendor}.")

    def as_sqlite(self, compiler: SQLCompiler, connection: Any) -> tuple[str, list[Any]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        sql = f"EXISTS (SELECT 1 FROM json_each({lhs}) AS tag WHERE tag.value = {rhs})"
        return sql, [*lhs_params, *rhs_params]

    def as_postgresql(self, compiler: SQLCompiler, connection: Any) -> tuple[str, list[Any]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        return f"{lhs} @> %s::jsonb", [*lhs_params, json.dumps([self.rhs])]
