// Drives the web console in headless Chromium (run by tests/console.rs): the page connects, an
// event POSTed now appears in the live tail with its type and sequence, the per-type count and the
// detail pane follow, and the stats poll shows this page's own subscription. Saves a screenshot.
//
// Environment: GATEWAY_URL (http://127.0.0.1:PORT), PLAYWRIGHT_DIR (a folder whose node_modules
// holds playwright-core), CHROMIUM (the browser binary), FIXTURE (the JSON file to POST),
// SCREENSHOT (where to save the PNG). Exits non-zero with a message when a check fails.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env('GATEWAY_URL');
const { chromium } = createRequire(join(env('PLAYWRIGHT_DIR'), 'package.json'))('playwright-core');
const fixture = readFileSync(env('FIXTURE'));
const fixtureEvent = JSON.parse(fixture).ChatEvent;
const WAIT = 15_000;

const step = (text) => console.log(`check: ${text}`);

// A new empty profile for every run; the flags keep Chromium off the (closed) network.
const profile = mkdtempSync(join(tmpdir(), 'console-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: env('CHROMIUM'),
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  timeout: 60_000,
  viewport: { width: 1440, height: 900 },
  deviceScaleFactor: 1,
});

const problems = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console error: ${message.text()}`);
  });

  await page.goto(base + '/', { waitUntil: 'domcontentloaded' });
  await page.locator('#conn[data-state="connected"]').waitFor({ timeout: WAIT });
  step('the page connected to the event stream');

  // The events stored before the page opened arrive through tail=50.
  await page.locator('#events tr[data-sequence]').first().waitFor({ timeout: WAIT });
  const before = await page.locator('#events tr[data-sequence]').count();
  const countOf = async (type) => {
    const item = page.locator(`#type-counts li[data-type="${type}"] .count`);
    return (await item.count()) ? Number((await item.textContent()).replace(/\D/g, '')) : 0;
  };
  const typeBefore = await countOf(fixtureEvent.Type);
  step(`${before} earlier events shown on load; ${typeBefore} of type ${fixtureEvent.Type}`);

  const response = await fetch(base + '/v1/events', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: fixture,
  });
  const answer = await response.json();
  if (response.status !== 200 || answer.duplicate !== false) {
    throw new Error(`POST /v1/events answered ${response.status} ${JSON.stringify(answer)}`);
  }
  const sequence = answer.sequence;
  step(`posted ChatEvent ${fixtureEvent.Id} (${fixtureEvent.Type}): sequence ${sequence}`);

  const newRow = page.locator(`#events tr[data-sequence="${sequence}"]`);
  await newRow.waitFor({ timeout: WAIT });
  const cells = await newRow.locator('td').allTextContents();
  if (cells[0] !== String(sequence) || cells[2] !== fixtureEvent.Type) {
    throw new Error(`the new row shows ${JSON.stringify(cells)}`);
  }
  const firstSequence = await page.locator('#events tr[data-sequence]').first().getAttribute('data-sequence');
  if (firstSequence !== String(sequence)) throw new Error(`newest first: the top row is ${firstSequence}`);
  step(`the row appeared on top: ${JSON.stringify(cells)}`);

  await page.waitForFunction(
    ([type, expected]) => {
      const item = document.querySelector(`#type-counts li[data-type="${type}"] .count`);
      return item && Number(item.textContent.replace(/\D/g, '')) === expected;
    },
    [fixtureEvent.Type, typeBefore + 1],
    { timeout: WAIT },
  );
  step(`the ${fixtureEvent.Type} count went from ${typeBefore} to ${typeBefore + 1}`);

  await newRow.click();
  const detail = page.locator('#detail-json');
  await page.waitForFunction(
    (id) => document.getElementById('detail-json').textContent.includes(`"Id": ${id}`),
    fixtureEvent.Id,
    { timeout: WAIT },
  );
  const title = await page.locator('#detail-title').textContent();
  if (!title.includes(`#${sequence}`)) throw new Error(`the detail pane is titled ${title}`);
  step(`clicking the row shows its JSON (${(await detail.textContent()).length} characters)`);

  // A body with fields that do not fit the proto: stored, marked in its row, listed in the detail.
  const oddId = Date.now();
  const odd = await fetch(base + '/v1/events', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      ChatEvent: { Id: oddId, Type: 'message_created', Public: 1 },
      Rels: { ChatMessages: [{ Id: 1, NoticeId: 'n-1', Text: 'Привет' }] },
    }),
  });
  const oddAnswer = await odd.json();
  if (odd.status !== 200 || !Array.isArray(oddAnswer.deviations) || oddAnswer.deviations.length !== 2) {
    throw new Error(`POST of a body with deviations answered ${odd.status} ${JSON.stringify(oddAnswer)}`);
  }
  const oddRow = page.locator(`#events tr[data-sequence="${oddAnswer.sequence}"]`);
  await oddRow.waitFor({ timeout: WAIT });
  const mark = await oddRow.locator('.deviation-mark').textContent();
  if (!mark.includes('2')) throw new Error(`the row marks its deviations as ${JSON.stringify(mark)}`);
  await oddRow.click();
  await page.locator('#detail-deviations:not([hidden])').waitFor({ timeout: WAIT });
  const listed = await page.locator('#deviation-list li').allTextContents();
  if (!listed.some((text) => text.includes('Rels.ChatMessages[0].NoticeId') && text.includes('dropped'))) {
    throw new Error(`the detail lists ${JSON.stringify(listed)}`);
  }
  step(`a body with deviations is marked (${mark}) and lists them: ${JSON.stringify(listed)}`);
  await newRow.click();
  await page.locator('#detail-deviations[hidden]').waitFor({ state: 'attached', timeout: WAIT });

  // The stats poll: this page's own stream is a subscriber, and the totals include the post.
  await page.locator('#subs tr[data-subscriber]').first().waitFor({ timeout: WAIT });
  await page.waitForFunction(
    (expected) => Number(document.getElementById('stored').textContent.replace(/\D/g, '')) >= expected,
    sequence,
    { timeout: WAIT },
  );
  await page.locator('#ready[data-state="ready"]').waitFor({ timeout: WAIT });
  step('stats show the subscriber, the stored total and a ready store');

  // Let the rate chart draw a few points before the picture is taken.
  await page.waitForFunction(() => document.getElementById('rate-line').getAttribute('d') !== '', null, {
    timeout: WAIT,
  });
  await page.waitForTimeout(1300); // the new-row highlight fades
  await page.screenshot({ path: env('SCREENSHOT'), fullPage: true });
  step(`screenshot saved to ${env('SCREENSHOT')}`);

  // A filter reconnects the stream: only that type is shown and counted, and the URL keeps it.
  await page.fill('#f-type', fixtureEvent.Type);
  await page.click('#filters button[type="submit"]');
  await page.waitForFunction(
    (type) => {
      const rows = [...document.querySelectorAll('#events tr[data-sequence]')];
      const counted = [...document.querySelectorAll('#type-counts li')].map((li) => li.dataset.type);
      return (
        document.getElementById('conn').dataset.state === 'connected' &&
        rows.length > 0 &&
        rows.every((row) => row.dataset.type === type) &&
        counted.length === 1 &&
        counted[0] === type
      );
    },
    fixtureEvent.Type,
    { timeout: WAIT },
  );
  if (new URL(page.url()).searchParams.get('type') !== fixtureEvent.Type) {
    throw new Error(`the page URL does not keep the filter: ${page.url()}`);
  }
  step(`filtering on type ${fixtureEvent.Type} reconnected and shows only that type`);

  if (problems.length) throw new Error(`the page reported errors:\n${problems.join('\n')}`);
} catch (error) {
  console.error(`check failed: ${error.message}`);
  if (problems.length && !error.message.startsWith('the page reported')) console.error(problems.join('\n'));
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
