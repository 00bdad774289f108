# The billing image: one image for every process (worker, beat, web, flower, migrate, sandbox).
# docker-compose.yml chooses the command and each service's health check (python, celery and
# billing are all on the PATH; the checks need nothing else); nothing secret is baked in: every
# key comes from the environment at run time.

# -- build: wheels for the project and its dependencies ------------------------------------
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY billing ./billing
COPY workers ./workers
COPY schedules ./schedules
# The project with all its dependencies, Flower among them (`celery -A workers.app flower`).
RUN pip wheel --wheel-dir /wheels .

# -- run -------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels fatora-billing \
    && rm -rf /wheels \
    && useradd --create-home --home-dir /home/billing --uid 10001 --user-group billing

# The working directory is the user's own: celery beat keeps its schedule file there
# (/home/billing/celerybeat-schedule, whose age is beat's health check).
USER billing
WORKDIR /home/billing
COPY --chown=billing:billing plans.example.toml ./plans.example.toml

# A worker on every queue by default; docker-compose.yml names the command of each service.
CMD ["celery", "-A", "workers.app", "worker", "-Q", "charges,notifications,maintenance", "--loglevel=INFO"]
