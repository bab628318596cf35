"""`gristmill crawl SEED... --out DIR`: the crawl stage outside a workflow, same folder layout."""

from __future__ import annotations

from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from gristmill.pipeline.crawl.stage import LOG_FILE, CrawlConfig, run_crawl

console = Console(stderr=True)


def _default(key: str):
    """The config model's default, so the command and the workflow key never disagree."""
    return CrawlConfig.model_fields[key].default


def crawl_command(
    seeds: list[str] = typer.Argument(None, help="Seed URLs (relative to the served root with --serve-directory)"),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for warc/, crawl_log.parquet and the resume state"),
    seeds_file: Path | None = typer.Option(None, help="File with one seed URL per line (# comments)"),
    serve_directory: Path | None = typer.Option(None, help="Serve this folder on 127.0.0.1 and crawl it"),
    max_pages: int = typer.Option(_default("max_pages"), help="Stop after this many pages stored"),
    max_depth: int = typer.Option(_default("max_depth"), help="Links followed from a seed (seeds are depth 0)"),
    concurrency: int = typer.Option(_default("concurrency"), help="Requests in flight in all"),
    per_host_concurrency: int = typer.Option(_default("per_host_concurrency"), help="Requests in flight per host"),
    delay: float = typer.Option(_default("delay_s"), help="Seconds between requests to one host (robots.txt Crawl-delay may raise it)"),
    user_agent: str = typer.Option(_default("user_agent"), help="User-Agent header, also matched against robots.txt"),
    same_host: bool = typer.Option(True, help="Stay on the seeds' hosts (ignored with --allowed-domain)"),
    allowed_domain: list[str] = typer.Option([], help="Crawl these domains and their subdomains (repeatable)"),
    include: list[str] = typer.Option([], help="Only URLs matching one of these regexes (repeatable)"),
    exclude: list[str] = typer.Option([], help="Skip URLs matching any of these regexes (repeatable)"),
    allow_network: list[str] = typer.Option(
        [], help="Also allow connecting to this private/loopback address or network, e.g. 10.0.0.0/8 (repeatable)"
    ),
    timeout: float = typer.Option(_default("timeout_s"), help="Seconds per request, all in"),
    max_retries: int = typer.Option(_default("max_retries"), help="Retries of a 429, 5xx or network error"),
    max_body_bytes: int = typer.Option(_default("max_body_bytes"), help="Pages larger than this are skipped"),
    content_type: list[str] = typer.Option(
        _default("content_types"), help="Media types kept (repeatable)"
    ),
    obey_robots: bool = typer.Option(True, help="Obey robots.txt"),
    obey_meta_robots: bool = typer.Option(True, help="Follow no link of a page whose meta robots says nofollow"),
    follow_nofollow_links: bool = typer.Option(False, help='Also follow links marked rel="nofollow"'),
    log_part_rows: int = typer.Option(_default("log_part_rows"), help="Write a crawl_log/ part every this many rows"),
    log_part_interval: float = typer.Option(
        _default("log_part_interval_s"), help="... or every this many seconds, whichever comes first"
    ),
) -> None:
    """Crawl SEED URLs into --out (WARC files + crawl log); run it again to resume."""
    try:
        config = CrawlConfig(
            type="crawl",
            seeds=seeds or [],
            seeds_file=str(seeds_file) if seeds_file else None,
            serve_directory=str(serve_directory) if serve_directory else None,
            max_pages=max_pages,
            max_depth=max_depth,
            concurrency=concurrency,
            per_host_concurrency=per_host_concurrency,
            delay_s=delay,
            user_agent=user_agent,
            same_host=same_host,
            allowed_domains=allowed_domain,
            include=include,
            exclude=exclude,
            allow_networks=allow_network,
            timeout_s=timeout,
            max_retries=max_retries,
            max_body_bytes=max_body_bytes,
            content_types=content_type,
            obey_robots=obey_robots,
            obey_meta_robots=obey_meta_robots,
            follow_nofollow_links=follow_nofollow_links,
            log_part_rows=log_part_rows,
            log_part_interval_s=log_part_interval,
        )
        result = run_crawl(config, out, base_dir=Path.cwd())
    except (ValidationError, ValueError, OSError) as error:
        console.print(f"[red]crawl error:[/red] {error}")
        raise typer.Exit(2) from None
    table = Table(title=f"crawl -> {out}", show_header=False)
    for key, value in result.counts.items():
        table.add_row(key, f"{value:,}")
    console.print(table)
    console.print(f"WARC files: {out / 'warc'}   log: {out / LOG_FILE}")
