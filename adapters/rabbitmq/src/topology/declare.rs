//! Declaring the queues on the broker, each on a channel of its own.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use super::Topology;
use super::arguments::GUARD_ARGUMENTS;
use super::delay::bucket_exp;
use crate::error::{Error, Result, mismatch};

impl Topology {
    /// Declares the queue and the dead-letter queue, each on a fresh channel of
    /// `connection`. Declaring what exists with the same arguments does nothing. Delay
    /// queues are declared by the consumer when first used; see
    /// [`declare_delay_queues`](Self::declare_delay_queues) to create them ahead.
    ///
    /// # Errors
    /// [`Error::TopologyMismatch`] naming the argument when a queue exists with other
    /// arguments; [`Error::Amqp`] when the broker fails otherwise.
    pub async fn declare(&self, connection: &lapin::Connection) -> Result<()> {
        self.validate()?;
        if let Err(e) = declare_queue(connection, &self.queue, self.queue_arguments()).await {
            let guard = matches!(&e, Error::TopologyMismatch { argument, .. }
                if GUARD_ARGUMENTS.contains(&argument.as_str()));
            if guard {
                // The broker names the first argument that differs, and a queue of the
                // other kind lacks the guard too: declaring the kind alone (which changes
                // nothing on a queue that exists) tells the two apart.
                if let Err(kind @ Error::TopologyMismatch { .. }) =
                    declare_queue(connection, &self.queue, self.kind_arguments()).await
                {
                    return Err(kind);
                }
            }
            return Err(e);
        }
        if let Some(dlq) = &self.dead_letter_queue {
            declare_queue(connection, dlq, self.kind_arguments()).await?;
        }
        Ok(())
    }

    /// Declares every delay queue up to the largest delay, for consumers built with
    /// [`declare(false)`](crate::ConsumerBuilder::declare).
    ///
    /// # Errors
    /// As [`declare`](Self::declare).
    pub async fn declare_delay_queues(&self, connection: &lapin::Connection) -> Result<()> {
        self.validate()?;
        for exp in self.bucket_exps() {
            declare_queue(
                connection,
                &self.bucket_queue(exp),
                self.delay_queue_arguments(exp),
            )
            .await?;
        }
        Ok(())
    }

    /// Declares the delay queue that holds a message delayed by `delay`; returns its name.
    pub(crate) async fn declare_delay_queue(
        &self,
        connection: &lapin::Connection,
        delay: Duration,
    ) -> Result<String> {
        let exp = bucket_exp(delay);
        let name = self.bucket_queue(exp);
        declare_queue(connection, &name, self.delay_queue_arguments(exp)).await?;
        Ok(name)
    }
}

/// Declares a durable queue on a channel of its own (a failed declare closes its channel).
async fn declare_queue(connection: &lapin::Connection, name: &str, args: FieldTable) -> Result<()> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "declared").await;
            Ok(())
        }
        Err(e) => Err(mismatch(name, e)),
    }
}
