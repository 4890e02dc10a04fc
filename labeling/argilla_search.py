"""A search engine for argilla-server that answers from Argilla's own SQL tables (no Elasticsearch).

argilla-server 2.8.0 insists on Elasticsearch or OpenSearch, neither of which can be installed on
our machines. Its engine is a plug-in: a ``SearchEngine`` subclass registered under a name and chosen
with ``ARGILLA_SEARCH_ENGINE``. Every write path commits to the SQL database *before* it calls the
engine, so the SQL tables are always the truth: index maintenance here is a no-op and every read is a
query on ``records`` / ``responses`` / ``suggestions`` / ``vectors``.

This module runs inside the Argilla server's own virtual environment (``labeling/server_env.py`` builds
it), imported by ``labeling/argilla_launcher.py`` before the app starts. It may import only
argilla_server, sqlalchemy and the standard library. It leans on the engine interface of
argilla-server 2.8.0 exactly, which ``labeling/server_env.py`` pins.

Semantics follow the Elasticsearch engine where they matter to the web UI and the SDK:
- a response-status filter ``pending`` means "this user (or, unscoped, anyone) has no response";
- ``search`` without a sort but with a ``user_id`` returns records in a per-user shuffled order that
  is stable for that user (ES: ``random_score(seed=user_id)``), so annotators spread over the queue;
  without either, records come in insertion order;
- the text query is a case-insensitive substring match per word, all words required (ES:
  ``simple_query_string`` with AND), over every text field or the one named;
- ``similarity_search`` ranks by cosine similarity scored ``(1 + cos) / 2`` like ES kNN.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Iterable, List, Optional, Set, Union
from uuid import UUID

from sqlalchemy import Float, String, and_, cast, event, exists, false, func, not_, or_, select, true

from argilla_server.database import AsyncSessionLocal, async_engine
from argilla_server.enums import (
    MetadataPropertyType,
    RecordStatus,
    ResponseStatus,
    ResponseStatusFilter,
    SimilarityOrder,
    SortOrder,
)
from argilla_server.models import (
    Dataset,
    Field,
    MetadataProperty,
    Question,
    Record,
    Response,
    Suggestion,
    User,
    Vector,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)

ENGINE_NAME = "align-sql"
ENGINE_VERSION = "1"

_RECORD_COLUMNS = {
    "id": Record.id,
    "external_id": Record.external_id,
    "inserted_at": Record.inserted_at,
    "updated_at": Record.updated_at,
    "status": Record.status,
}
_SUGGESTION_COLUMNS = {
    "value": Suggestion.value,
    "score": Suggestion.score,
    "agent": Suggestion.agent,
    "type": Suggestion.type,
}
# Simple-query-string syntax that has no meaning for a substring match.
_QUERY_OPERATORS = re.compile(r'^[+\-|]+|[*~]\d*$')


# SQLite's lower() and LIKE fold ASCII only; ES analyzers fold any letter ("Ü" finds "ü").
_CASEFOLD = "align_casefold"
_casefold_ready = False

if async_engine.dialect.name == "sqlite":

    @event.listens_for(async_engine.sync_engine, "connect")
    def _register_casefold(dbapi_connection, connection_record):
        global _casefold_ready
        dbapi_connection.create_function(
            _CASEFOLD, 1, lambda text: text.casefold() if isinstance(text, str) else text, deterministic=True
        )
        _casefold_ready = True


@SearchEngine.register(engine_name=ENGINE_NAME)
class SQLSearchEngine(SearchEngine):
    """Answers Argilla's search-engine calls from its SQL database; holds no state of its own."""

    @classmethod
    async def new_instance(cls) -> "SQLSearchEngine":
        return cls()

    async def close(self):
        pass

    async def ping(self) -> bool:
        try:
            async with AsyncSessionLocal() as db:
                await db.execute(select(1))
        except Exception:
            return False
        return True

    async def info(self) -> dict:
        return {
            "name": ENGINE_NAME,
            "version": ENGINE_VERSION,
            "description": "align: search answered from Argilla's SQL database",
        }

    # --- Index maintenance: the SQL tables are the index, already committed by the caller. ---

    async def create_index(self, dataset: Dataset):
        pass

    async def delete_index(self, dataset: Dataset):
        pass

    async def configure_metadata_property(self, dataset: Dataset, metadata_property: MetadataProperty):
        pass

    async def configure_index_vectors(self, vector_settings: VectorSettings):
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def partial_record_update(self, record: Record, **update):
        pass

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]):
        pass

    async def update_record_response(self, response: Response):
        pass

    async def delete_record_response(self, response: Response):
        pass

    async def update_record_suggestion(self, suggestion: Suggestion):
        pass

    async def delete_record_suggestion(self, suggestion: Suggestion):
        pass

    # --- Reads ---

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        if dataset.is_draft:
            return {}
        async with AsyncSessionLocal() as db:
            rows = await db.execute(
                select(Record.status, func.count(Record.id))
                .where(Record.dataset_id == dataset.id)
                .group_by(Record.status)
            )
            counts = {_text(status): count for status, count in rows.all()}
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        if dataset.is_draft:
            return {}
        async with AsyncSessionLocal() as db:
            rows = await db.execute(
                select(Response.status, func.count(Response.id))
                .join(Record, Record.id == Response.record_id)
                .where(Record.dataset_id == dataset.id, Response.user_id == user.id)
                .group_by(Response.status)
            )
            counts = {_text(status): count for status, count in rows.all()}
        return {"total": sum(counts.values()), **counts}

    async def search(
        self,
        dataset: Dataset,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        sort: Optional[List[Order]] = None,
        offset: int = 0,
        limit: int = 100,
        user_id: Optional[Union[UUID, str]] = None,
    ) -> SearchResponses:
        async with AsyncSessionLocal() as db:
            condition = await self._condition(db, dataset, query, filter)
            if not sort and user_id:
                # ES: random_score(seed=user_id): a different order per user, stable for each.
                ids = (await db.scalars(select(Record.id).where(condition))).all()
                seed = str(user_id)
                ids = sorted(ids, key=lambda record_id: _shuffle_key(seed, record_id))
                page = ids[offset:offset + limit] if limit else []
                total = len(ids)
            else:
                order_by = []
                for order in sort or []:
                    order_by.append(await self._order_clause(db, dataset, order))
                order_by += [Record.inserted_at.asc(), Record.id.asc()]
                page = (
                    await db.scalars(
                        select(Record.id).where(condition).order_by(*order_by).offset(offset).limit(limit)
                    )
                ).all()
                total = await db.scalar(select(func.count(Record.id)).where(condition))
        return SearchResponses(
            items=[SearchResponseItem(record_id=record_id, score=1.0) for record_id in page],
            total=total or 0,
        )

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        async with AsyncSessionLocal() as db:
            values = (
                await db.scalars(
                    select(Record.metadata_).where(
                        Record.dataset_id == metadata_property.dataset_id, Record.metadata_.is_not(None)
                    )
                )
            ).all()
        found = []
        for metadata in values:
            value = (metadata or {}).get(metadata_property.name)
            if value is None:
                continue
            found.extend(value if isinstance(value, list) else [value])

        if metadata_property.type == MetadataPropertyType.terms:
            counts = Counter(str(v) for v in found)
            ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            return TermsMetrics(
                total=sum(counts.values()),
                values=[TermsMetrics.TermCount(term=term, count=count) for term, count in ordered],
            )
        numbers = [v for v in found if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics_class = (
            IntegerMetadataMetrics if metadata_property.type == MetadataPropertyType.integer else FloatMetadataMetrics
        )
        if not numbers:
            return metrics_class()
        return metrics_class(min=min(numbers), max=max(numbers))

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: Optional[List[float]] = None,
        record: Optional[Record] = None,
        query: Optional[Union[TextQuery, str]] = None,
        filter: Optional[Filter] = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: Optional[float] = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")

        async with AsyncSessionLocal() as db:
            excluded_id = None
            if not value:
                excluded_id = record.id
                value = await db.scalar(
                    select(Vector.value).where(
                        Vector.record_id == record.id, Vector.vector_settings_id == vector_settings.id
                    )
                )
            if not value:
                raise ValueError("Cannot find a vector value to apply with provided info")

            condition = await self._condition(db, dataset, query, filter)
            if excluded_id is not None:
                condition = and_(condition, Record.id != excluded_id)
            rows = (
                await db.execute(
                    select(Vector.record_id, Vector.value)
                    .join(Record, Record.id == Vector.record_id)
                    .where(Vector.vector_settings_id == vector_settings.id, condition)
                )
            ).all()

        target = [float(x) for x in value]
        if order == SimilarityOrder.least_similar:
            target = [-x for x in target]
        scored = []
        for record_id, vector in rows:
            score = (1.0 + _cosine(target, vector)) / 2.0
            if threshold is None or score >= threshold:
                scored.append((score, record_id))
        scored.sort(key=lambda item: (-item[0], str(item[1])))
        scored = scored[:max_results]
        return SearchResponses(
            items=[SearchResponseItem(record_id=record_id, score=score) for score, record_id in scored],
            total=len(scored),
        )

    # --- Translating queries, filters and sorts into SQL ---

    async def _condition(self, db, dataset: Dataset, query, filter: Optional[Filter]):
        clauses = [Record.dataset_id == dataset.id]
        if query is not None:
            clauses.append(await self._text_clause(db, dataset, query))
        if filter is not None:
            clauses.append(await self._filter_clause(db, dataset, filter))
        return and_(*clauses)

    async def _text_clause(self, db, dataset: Dataset, query: Union[TextQuery, str]):
        if isinstance(query, str):
            query = TextQuery(q=query)
        fields = (await db.execute(select(Field.name, Field.settings).where(Field.dataset_id == dataset.id))).all()
        names = [name for name, settings in fields if (settings or {}).get("type") != "image"]
        if query.field:
            if query.field not in {name for name, _ in fields}:
                raise ValueError(f"Field {query.field} not found in dataset {dataset.id}")
            names = [query.field]
        words = _query_words(query.q)
        if not words:
            return true()
        if not names:
            return false()
        per_word = []
        for word in words:
            pattern = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            per_word.append(or_(*(_contains(Record.fields[name].as_string(), pattern) for name in names)))
        return and_(*per_word)

    async def _filter_clause(self, db, dataset: Dataset, filter: Filter):
        if isinstance(filter, AndFilter):
            if not filter.filters:
                return true()
            return and_(*[await self._filter_clause(db, dataset, f) for f in filter.filters])
        scope = filter.scope
        if isinstance(scope, RecordFilterScope):
            return _record_filter(scope.property, filter)
        if isinstance(scope, MetadataFilterScope):
            return _metadata_filter(scope.metadata_property, filter)
        if isinstance(scope, ResponseFilterScope):
            if scope.question:
                ids = await self._response_value_matches(db, dataset, scope, filter)
                return Record.id.in_(ids) if ids else false()
            if scope.property == "status" and isinstance(filter, TermsFilter):
                return _response_status_filter(scope, filter)
            raise ValueError(f"Cannot process filter scope {scope}")
        if isinstance(scope, SuggestionFilterScope):
            ids = await self._suggestion_matches(db, dataset, scope, filter)
            return Record.id.in_(ids) if ids else false()
        raise ValueError(f"Cannot process filter {filter}")

    async def _response_value_matches(self, db, dataset: Dataset, scope: ResponseFilterScope, filter) -> Set[UUID]:
        statement = (
            select(Response.record_id, Response.values)
            .join(Record, Record.id == Response.record_id)
            .where(Record.dataset_id == dataset.id)
        )
        if scope.user is not None:
            statement = statement.where(Response.user_id == scope.user.id)
        matches = set()
        for record_id, values in (await db.execute(statement)).all():
            answer = (values or {}).get(scope.question)
            if isinstance(answer, dict) and _value_matches(answer.get("value"), filter):
                matches.add(record_id)
        return matches

    async def _suggestion_matches(self, db, dataset: Dataset, scope: SuggestionFilterScope, filter) -> Set[UUID]:
        column = _SUGGESTION_COLUMNS.get(scope.property)
        if column is None:
            raise ValueError(f"Cannot process filter scope {scope}")
        statement = (
            select(Suggestion.record_id, column)
            .join(Question, Question.id == Suggestion.question_id)
            .where(Question.dataset_id == dataset.id, Question.name == scope.question)
        )
        return {
            record_id
            for record_id, value in (await db.execute(statement)).all()
            if _value_matches(value, filter)
        }

    async def _order_clause(self, db, dataset: Dataset, order: Order):
        scope = order.scope
        if isinstance(scope, RecordFilterScope):
            column = _RECORD_COLUMNS.get(str(scope.property))
            if column is None:
                raise ValueError(f"Cannot sort by record property {scope.property}")
            key = column
        elif isinstance(scope, MetadataFilterScope):
            kind = await db.scalar(
                select(MetadataProperty.settings["type"].as_string()).where(
                    MetadataProperty.dataset_id == dataset.id, MetadataProperty.name == scope.metadata_property
                )
            )
            element = Record.metadata_[scope.metadata_property]
            key = element.as_string() if kind == MetadataPropertyType.terms else element.as_float()
        elif isinstance(scope, SuggestionFilterScope):
            column = _SUGGESTION_COLUMNS.get(scope.property)
            if column is None:
                raise ValueError(f"Cannot sort by suggestion property {scope.property}")
            if scope.property == "score":
                column = cast(Suggestion.score, Float)
            elif scope.property in ("agent", "type"):
                column = cast(column, String)
            key = (
                select(func.max(column))
                .join(Question, Question.id == Suggestion.question_id)
                .where(Suggestion.record_id == Record.id, Question.name == scope.question)
                .scalar_subquery()
            )
        elif isinstance(scope, ResponseFilterScope):
            # ES: the average over the responses (of the scoped user).
            if scope.question:
                column = func.avg(Response.values[(scope.question, "value")].as_float())
            else:
                column = func.min(cast(Response.status, String))
            statement = select(column).where(Response.record_id == Record.id)
            if scope.user is not None:
                statement = statement.where(Response.user_id == scope.user.id)
            key = statement.scalar_subquery()
        else:
            raise ValueError(f"Cannot sort by {scope}")
        # ES puts records without a value last in either direction.
        return (key.desc() if order.order == SortOrder.desc else key.asc()).nulls_last()


def _contains(text, pattern: str):
    if _casefold_ready:  # set once the first connection (made before any search) registered it
        return getattr(func, _CASEFOLD)(text).like(pattern.casefold(), escape="\\")
    return text.ilike(pattern, escape="\\")


def _record_filter(prop: str, filter: Filter):
    prop = str(prop)
    column = _RECORD_COLUMNS.get(prop)
    if column is None:
        raise ValueError(f"Cannot filter by record property {prop}")
    if isinstance(filter, TermsFilter):
        if prop == "status":
            statuses = [RecordStatus(v) for v in filter.values if v in RecordStatus.__members__]
            return column.in_(statuses) if statuses else false()
        if prop == "id":
            ids = []
            for value in filter.values:
                try:
                    ids.append(UUID(str(value)))
                except ValueError:
                    pass
            return column.in_(ids) if ids else false()
        return column.in_([str(v) for v in filter.values])
    if isinstance(filter, RangeFilter):
        convert = _to_datetime if prop in ("inserted_at", "updated_at") else (lambda v: v)
        clauses = []
        if filter.ge is not None:
            clauses.append(column >= convert(filter.ge))
        if filter.le is not None:
            clauses.append(column <= convert(filter.le))
        return and_(*clauses) if clauses else true()
    raise ValueError(f"Cannot process filter {filter}")


def _metadata_filter(name: str, filter: Filter):
    element = Record.metadata_[name]
    if isinstance(filter, TermsFilter):
        values = [str(v) for v in filter.values]
        # A terms value may be stored as a string or as a list of strings.
        return or_(
            element.as_string().in_(values),
            *(func.instr(cast(element, String), _json_string(v)) > 0 for v in values),
        ) if values else false()
    if isinstance(filter, RangeFilter):
        number = element.as_float()
        clauses = [number.is_not(None)]
        if filter.ge is not None:
            clauses.append(number >= float(filter.ge))
        if filter.le is not None:
            clauses.append(number <= float(filter.le))
        return and_(*clauses)
    raise ValueError(f"Cannot process filter {filter}")


def _response_status_filter(scope: ResponseFilterScope, filter: TermsFilter):
    values = [str(v) for v in filter.values]  # never mutate the caller's filter (ES does)
    user_id = scope.user.id if scope.user is not None else None
    mine = Response.record_id == Record.id
    if user_id is not None:
        mine = and_(mine, Response.user_id == user_id)
    clauses = []
    if ResponseStatusFilter.pending.value in values:
        # "pending" for a response: this user (or, unscoped, anybody) has not responded.
        clauses.append(not_(exists().where(mine)))
    statuses = [ResponseStatus(v) for v in values if v in ResponseStatus.__members__]
    if statuses:
        clauses.append(exists().where(mine, Response.status.in_(statuses)))
    return or_(*clauses) if clauses else false()


def _value_matches(value: Any, filter: Filter) -> bool:
    """Whether a stored answer or suggestion (scalar, list, or ranking list) passes the filter."""
    if isinstance(value, list):
        return any(_value_matches(item.get("value") if isinstance(item, dict) else item, filter) for item in value)
    if value is None:
        return False
    if isinstance(filter, TermsFilter):
        return _text(value) in {str(v) for v in filter.values}
    if isinstance(filter, RangeFilter):
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        if filter.ge is not None and number < float(filter.ge):
            return False
        if filter.le is not None and number > float(filter.le):
            return False
        return True
    return False


def _query_words(text: str) -> List[str]:
    """Words (or "quoted phrases") of a simple query string, operators dropped."""
    words = []
    for quoted, bare in re.findall(r'"([^"]*)"|(\S+)', str(text)):
        word = quoted if quoted else _QUERY_OPERATORS.sub("", bare)
        if word.strip() and word.upper() not in ("AND", "OR"):
            words.append(word.strip())
    return words


def _shuffle_key(seed: str, record_id: UUID) -> bytes:
    return hashlib.blake2b(f"{seed}:{record_id}".encode(), digest_size=8).digest()


def _cosine(a: List[float], b: List[float]) -> float:
    if not b or len(a) != len(b):
        return -1.0
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, (int, float)):  # ES reads numbers on a date field as epoch milliseconds
        return datetime.fromtimestamp(value / 1000, tz=timezone.utc).replace(tzinfo=None)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if parsed.tzinfo is not None:  # Argilla stores naive UTC
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def _json_string(value: str) -> str:
    # As SQLAlchemy stored it: json.dumps with its default ASCII escaping.
    return json.dumps(value)


def _text(value: Any) -> str:
    return str(getattr(value, "value", value))
