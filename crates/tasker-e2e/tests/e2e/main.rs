//! End-to-end scenarios (`../shared/scenarios.md`): real Postgres and RabbitMQ, services
//! in-process, the gRPC API and a real AMQP subscriber. Each test has its own database and
//! broker prefix.

mod analytics;
mod auth;
mod broker_users;
mod edges;
mod events;
mod faults;
mod foreign;
mod hardening;
mod health;
mod metrics;
mod operator;
mod retention;
mod retries;
mod settlement;
mod shapes;
mod skeleton;
mod submission;
mod support;
mod templates;
mod tls;
mod traces;
