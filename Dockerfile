# One image runs any Tasker service: `docker run tasker:dev orchestrator`.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/task-api target/release/orchestrator target/release/step-worker \
       target/release/event-publisher target/release/taskerctl /out/

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 tasker
COPY --from=build /out/ /usr/local/bin/
USER tasker
EXPOSE 50051 9090 9091 9092 9093
ENTRYPOINT []
CMD ["task-api"]
