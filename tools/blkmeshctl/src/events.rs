//! `events`: the manager's event stream, one line per event.

use blkmesh_proto::client::ManagerChannel;
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::WatchEventsRequest;

use crate::failure::Failure;
use crate::stats;
use crate::view::Output;

pub(crate) async fn events(
    channel: ManagerChannel,
    out: Output,
    count: Option<u64>,
) -> Result<(), Failure> {
    use std::io::Write;
    let mut stream = StatsServiceClient::new(channel)
        .watch_events(WatchEventsRequest {})
        .await?
        .into_inner();
    let mut seen: u64 = 0;
    let mut stdout = std::io::stdout();
    while count.is_none_or(|n| seen < n) {
        let Some(event) = stream.message().await? else {
            return Err(Failure {
                code: "UNAVAILABLE",
                message: "the manager ended the event stream".into(),
            });
        };
        seen += 1;
        let line = stats::event_line(&event, out.json);
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // stdout closed (e.g. piped into `head`): done.
            return Ok(());
        }
    }
    Ok(())
}
