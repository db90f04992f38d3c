//! `egress top`: a live view of the processes sending the most.

use std::{path::Path, time::Duration};

use super::display;
use crate::api::client;

/// `egress top`: redraws in place on the alternate screen until q, Esc or Ctrl-C. With `json`:
/// the stats report as one JSON line per refresh (one with `once`).
pub fn top(socket: &Path, interval: f64, once: bool, json: bool) -> anyhow::Result<()> {
    use std::io::Write as _;

    use crossterm::{
        cursor, event, execute, queue,
        terminal::{self, ClearType},
    };
    let interval = Duration::from_secs_f64(interval.max(0.1));
    if json {
        loop {
            println!("{}", serde_json::to_string(&client::stats(socket)?)?);
            if once {
                return Ok(());
            }
            std::thread::sleep(interval);
        }
    }
    if once || !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let report = client::stats(socket)?;
        let (cols, rows) = terminal::size().unwrap_or((160, 50));
        for line in display::top_frame(&report, rows as usize, cols as usize) {
            println!("{line}");
        }
        return Ok(());
    }
    // Fail before touching the terminal if the controller is not there.
    client::stats(socket)?;
    let mut out = std::io::stdout();
    terminal::enable_raw_mode()?;
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    let result = (|| -> anyhow::Result<()> {
        loop {
            let report = client::stats(socket)?;
            let (cols, rows) = terminal::size().unwrap_or((80, 24));
            queue!(out, cursor::MoveTo(0, 0), terminal::Clear(ClearType::All))?;
            for (i, line) in display::top_frame(&report, rows as usize, cols as usize)
                .iter()
                .enumerate()
            {
                queue!(out, cursor::MoveTo(0, i as u16))?;
                write!(out, "{line}")?;
            }
            out.flush()?;
            if event::poll(interval)?
                && let event::Event::Key(k) = event::read()?
            {
                let ctrl_c = k.code == event::KeyCode::Char('c')
                    && k.modifiers.contains(event::KeyModifiers::CONTROL);
                if ctrl_c || matches!(k.code, event::KeyCode::Char('q') | event::KeyCode::Esc) {
                    return Ok(());
                }
            }
        }
    })();
    execute!(out, cursor::Show, terminal::LeaveAlternateScreen)?;
    terminal::disable_raw_mode()?;
    result
}
