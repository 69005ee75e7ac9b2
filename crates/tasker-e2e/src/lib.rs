//! Tasker's end-to-end suite lives in `tests/e2e/`: every scenario runs against a real
//! Postgres and RabbitMQ with the services started in-process, through the public gRPC
//! API and a real AMQP subscriber. This library is empty on purpose.
