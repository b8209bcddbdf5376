"""Every user-facing text of the bot, in English and Simplified Chinese.

`text(key, language_code, **params)` picks the language from a platform's language code
("zh", "zh-hans", "zh-CN", ... → Chinese; anything else → English).
"""

from __future__ import annotations

from typing import Any

CATALOGUE: dict[str, dict[str, str]] = {
    "en": {
        "thinking": "thinking…",
        "default_prompt": "Describe this image in one or two sentences.",
        "queued": "queued: {ordinal} in line, about {eta}",
        "queued_position": "queued: {ordinal} in line",
        "busy": "I'm busy right now ({queued} requests waiting). Please try again in ~{retry_s} s.",
        "failed": "Sorry, that failed, please try again. (reference {ref})",
        "timeout": "Sorry, that took too long and was stopped. Please try again. (reference {ref})",
        "cancelled": "Cancelled.",
        "nothing_to_cancel": "There is nothing to cancel.",
        "export_empty": "There is nothing stored for this chat yet.",
        "reset_done": "Done: I forgot this chat's history.",
        "empty_question": "Please send an image, or ask a question about an image you sent.",
        "no_image_yet": "Send a photo or an image file first, then ask about it.",
        "send_an_image": "Send a photo or an image file (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC).",
        "too_many_images": "That's {count} images; I take at most {limit} at once.",
        "question_too_long": "That question is {length} characters long; the limit is {limit}.",
        "not_allowed": "Sorry, this bot is private.",
        # quotas (bot/quotas.py): {limit}, {used}, {resets} ("2026-12-08 00:00 UTC")
        "quota_images": (
            "You have used {used} of your {limit} images for today, so I can't take these. "
            "The limit resets at {resets}."
        ),
        "quota_requests": (
            "You have used all {limit} of your requests for today. The limit resets at {resets}."
        ),
        "quota_engine": (
            "You have used {used} s of your {limit} s of model time for today. "
            "The limit resets at {resets}."
        ),
        "quota_waiting": (
            "Requests of yours waiting now: {used}, the most at once: {limit}. "
            "Please wait until one is answered."
        ),
        "rate_limited": "You're sending messages too fast. Please wait {retry_s} s.",
        "engine_loading": "The model is still loading. Please try again in a minute.",
        # remote engine (engine=openai)
        "remote_rejected": "The model server refused this request: {reason}",
        "remote_timeout": "The model server did not answer in time. Please try again. (reference {ref})",
        "remote_unavailable": (
            "The model server is unavailable right now. Please try again later. (reference {ref})"
        ),
        "remote_busy": "The model server is busy. Please try again in a minute. (reference {ref})",
        "answer_interrupted": (
            "The model server broke off this answer; the text above is incomplete. "
            "Please ask again. (reference {ref})"
        ),
        "empty_answer": "The model gave no answer. Please rephrase the question.",
        # image intake (codes from engine.intake)
        "empty_file": "That file is empty.",
        "too_large": "That file is {size}; the limit is {limit}.",
        "not_an_image": "That file is not an image I can read. Send a photo or an image file.",
        "unsupported_format": "{format} images are not supported. Send JPEG, PNG, WebP or HEIC.",
        "image_too_large_pixels": (
            "That image is {width}×{height} pixels, over the {limit_mp} MP limit."
        ),
        "corrupt_image": (
            "That image is damaged or incomplete: its data is corrupt or truncated, so I could not "
            "read it."
        ),
        "image_too_large_declared": (
            "That image's header declares a size far over the {limit_mp} MP limit: the file is "
            "either much too large or damaged, so I did not read it."
        ),
        # presets and the OCR engine
        "ocr_no_text": "I found no text in this image.",
        "engine_fallback_ocr": (
            "Note: the vision-language model is not available on this server, so I answer with "
            "OCR only: the text found in the image."
        ),
        "preset_invalid_output": (
            "Sorry, the model's answer did not fit the {preset} format, even after a second try. "
            "Please try again, or ask without a preset. (reference {ref})"
        ),
        "preset_needs_vlm": (
            "The {preset} preset needs the vision-language model, which this server does not run "
            "(OCR only). Use /ocr, or ask a question without a preset."
        ),
        "presets_help": (
            "Presets (before your question or in the photo's caption): /describe, /ocr, "
            "/extract (or /receipt, /invoice, /form, /menu), /triage."
        ),
        "pf_nothing_found": "Nothing found.",
        "pf_redacted": "redacted",
        "pf_merchant": "Merchant",
        "pf_address": "Address",
        "pf_date": "Date",
        "pf_time": "Time",
        "pf_subtotal": "Subtotal",
        "pf_tax": "Tax",
        "pf_tip": "Tip",
        "pf_total": "Total",
        "pf_payment_method": "Paid with",
        "pf_invoice_number": "Invoice no.",
        "pf_seller": "Seller",
        "pf_buyer": "Buyer",
        "pf_issue_date": "Issued",
        "pf_due_date": "Due",
        "pf_payment_terms": "Terms",
        "pf_severity": "Severity",
        "pf_severity_blocker": "blocker",
        "pf_severity_major": "major",
        "pf_severity_minor": "minor",
        "pf_product_area": "Area",
        "pf_error_message": "Error",
        "pf_error_code": "Code",
        "pf_user_action": "User was trying to",
        "pf_likely_cause": "Likely cause",
        "pf_next_step": "Next step",
        "pf_personal_data": "Personal data",
        "pf_pii_email": "email",
        "pf_pii_card": "card number",
        "pf_pii_phone": "phone number",
        "help": (
            "Send me a photo or a screenshot and ask about it: what it says, which fields a receipt "
            "holds, a one-line summary. Follow-up questions about the same image work.\n"
            "Commands: /ask <question> asks (in groups: or mention me), /export sends this chat as "
            "files, /reset forgets this chat, /cancel stops the current answer.\n"
            "Presets (before your question or in the photo's caption): {presets}.\n"
            "Model: {model}. Images up to {limit}."
        ),
        "unknown_command": (
            "I don't know the command /{command}. Commands: {commands}. Presets: {presets}."
        ),
        # Slack
        "slack_working": "working…",
        "slack_files_scope": (
            "I could not download that file: Slack sent a login page instead of the image. "
            "The app needs the files:read scope: add it under OAuth & Permissions (or in "
            "manifest.yml), reinstall the app, and send the image again."
        ),
        "slack_download_failed": (
            "I could not download {name} from Slack ({status}). Please upload it again."
        ),
        "slack_file_no_url": (
            "I could not download {name}: Slack gives me no download link for it. That happens with "
            "external files (Google Drive, Dropbox…) and files the bot may not access. Upload the "
            "image itself into Slack (drag it into the message box, or paste it) and ask again."
        ),
        "slack_skipped_files": (
            "I skipped {names}: only images (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC) can be read."
        ),
        "slack_link_not_https": "I only open https:// image links; {url} is not one.",
        "slack_link_failed": "I could not use the image link {url}: {reason}",
        "invalid_text": (
            "Your message contains characters that are not valid text (a broken Unicode sequence), "
            "so I cannot read it. Please type or paste it again."
        ),
        "slack_attach_hint": (
            "I found no image in this conversation. Upload a screenshot here (drag it into the "
            "message box, or paste it) and run {command} <question> again, or mention me in the "
            "message that has the image."
        ),
        "slack_not_in_channel": (
            "I can't read this channel. Invite me first: /invite @vlbot, then try again."
        ),
        "slack_continued": "(continued)",
        "slack_follow_ups_all": "reply in that thread to ask follow-up questions",
        "slack_follow_ups_mention": "mention me in that thread to ask follow-up questions",
        "slack_help": (
            "Mention me in a message with a screenshot and I answer in its thread; {follow_ups}. "
            "In a direct message just send the image.\n"
            "{command} <question> asks about the latest image in this channel, or about the images "
            "you link in it (Slack file links, https:// URLs); "
            "{command} reset forgets this conversation, {command} help shows this.\n"
            "Model: {model}. Images up to {limit}."
        ),
        # admin commands (bot/admin_chat.py; {command} is /allow on Telegram, /vlbot allow on Slack)
        "admin_only": "Sorry, only an admin of this bot can use {command}. Nothing was changed.",
        "admin_allowed": "Done: {who} may use the bot now.",
        "admin_denied": "Done: {who} may no longer use the bot.",
        "admin_quota_set": "Done: {who}'s quota is now {limits}. It applies at once.",
        "admin_extra_argument": "I did not expect {arg} there.",
        "admin_who_missing": "{command} needs to know whom it is about.",
        "admin_quota_empty": "Which limits? Give at least one of {names} as name=number.",
        "admin_not_a_setting": "{arg} is not a limit setting: write name=number ({names}).",
        "admin_unknown_limit": "{arg}: there is no limit called {name} (the limits: {names}).",
        "admin_limit_twice": "{name} is given twice.",
        "admin_negative": "{arg}: a limit cannot be negative.",
        "admin_not_a_number": "{arg} is not a number.",
        "admin_not_whole": "{arg} is not a whole number.",
        "admin_too_large": "{arg} is too large (at most {limit}).",
        "admin_bad_days": "{arg} is not a number of days (1 to {limit}).",
        "admin_bad_target": "{arg} is not a user or a chat I can name.",
        "admin_slack_plain_mention": (
            "{arg} reached me as plain text, not as a mention: pick the person or channel from "
            "Slack's suggestions, or turn on \"Escape channels, users, and links\" for the command "
            "(should_escape: true in manifest.yml)."
        ),
        "admin_not_me": "That is me, not a user.",
        "admin_who_telegram": (
            "who: reply to one of their messages, or give a user id (a number), a group's chat id "
            "(a negative number) or here (this chat)"
        ),
        "admin_who_slack": "who: @someone, #channel or here (this channel)",
        "admin_usage_allow": "Usage: {command} who ({who}).",
        "admin_usage_deny": "Usage: {command} who ({who}).",
        "admin_usage_quota": (
            "Usage: {command} who images=20 requests=50 engine=600 waiting=2 (any of them; "
            "engine in seconds; {who})."
        ),
        "admin_usage_usage": "Usage: {command} [who] [days] ({who}).",
        "admin_usage_others": "Sorry, only an admin can see someone else's use. /usage alone shows yours.",
        "admin_used_today": (
            "Your use today (UTC): requests {requests}, images {images}, engine time {engine} s; "
            "waiting now {waiting}."
        ),
        "admin_exempt": "You are an admin: no limits apply to you.",
        "admin_limit_images": "images",
        "admin_limit_requests": "requests",
        "admin_limit_engine": "engine seconds",
        "admin_limit_waiting": "waiting jobs",
        "admin_no_limit": "{name}: no limit",
        "admin_left_item": "{name}: {left} of {limit}",
        "admin_left_today": "Left: {items}.",
        "admin_resets": "The day's counts reset at {reset}.",
        "admin_limit_default": "{name}: default",
        "admin_per_day": "{name} {value}/day",
        "admin_seconds_per_day": "{name} {value}/day",
        "admin_at_once": "{name} {value} at once",
        "admin_report_of": " by {who}",
        "admin_report_head": (
            "Use in the last {days} days ({since} to {until}, UTC){whom}: requests {requests}, "
            "images {images}, engine time {engine} s; answered {answered}, failed {failed}, "
            "cancelled {cancelled}, refused {rejected}."
        ),
        "admin_report_first_token": "Time to first token: p50 {p50} s, p95 {p95} s.",
        "admin_report_no_first_token": "Time to first token: nothing timed yet.",
        "admin_report_top_users": "Top users:",
        "admin_report_top_chats": "Top chats:",
        "admin_report_top_line": "{rank}. {who}: requests {requests}, images {images}, {engine} s",
        "admin_report_images_per_day": "Images per day: {days}.",
        "admin_report_none": "none",
        "admin_label_user": "{platform} user {id}",
        "admin_label_chat": "{platform} chat {id}",
        "admin_label_key": "API key {id}",
        "admin_label_telegram_user": "user {id}",
        "admin_label_telegram_chat": "chat {id}",
        "admin_help": (
            "Admin: /allow who, /deny who, /quota who images=20 requests=50 engine=600 "
            "waiting=2, /usage [who] [days] (who: reply to their message, a user id, a group's "
            "chat id, or here); /autotriage on|off in a group (or /autotriage chat-id on|off): "
            "every image posted there is triaged without a mention. Changes apply at once and "
            "are logged."
        ),
        "admin_slack_help": (
            "Admin: {command} allow who, {command} deny who, {command} quota who images=20 "
            "requests=50 engine=600 waiting=2, {command} usage [who] [days] (who: @someone, "
            "#channel or here), {command} autotriage #channel|here on|off (every image posted "
            "there is triaged without a mention). Changes apply at once and are logged."
        ),
        "admin_usage_help": "/usage shows your use today and what is left of your limits.",
        "admin_slack_usage_help": "{command} usage shows your use today and what is left of your limits.",
        # /autotriage (bot/admin_chat.py; {where} names the group or channel)
        "admin_autotriage_on": (
            "Done: auto-triage is on in {where}. Every image posted there is triaged, no mention "
            "needed, from now on."
        ),
        "admin_autotriage_off": "Done: auto-triage is off in {where}.",
        "admin_autotriage_already_off": "Auto-triage is not on in {where}. Nothing was changed.",
        "admin_autotriage_settings_on": (
            "Auto-triage is already on in {where}: the settings name it ({setting}). Nothing was "
            "changed."
        ),
        "admin_autotriage_settings_off": (
            "Auto-triage in {where} comes from the settings ({setting}), so it cannot be turned "
            "off from a chat: remove it from {setting} and restart vlbot. Nothing was changed."
        ),
        "admin_autotriage_state_settings": "Auto-triage is on in {where}: the settings name it ({setting}).",
        "admin_autotriage_state_admin": "Auto-triage is on in {where}: {who} turned it on ({when} UTC).",
        "admin_autotriage_state_off": "Auto-triage is off in {where} ({command} on turns it on).",
        "admin_autotriage_bad_switch": "{arg}: write on or off.",
        "admin_autotriage_not_a_chat": "{arg} is a user: auto-triage is for a group or channel.",
        "admin_autotriage_not_group": (
            "Auto-triage is for a group or channel, not a private chat: send the command there, "
            "or name it."
        ),
        "admin_usage_autotriage": (
            "Usage: {command} [where] [on|off] (where: {who}; without on or off: whether it is on, "
            "and why)."
        ),
        "admin_where_telegram": "a group's chat id (a negative number), or none: this group",
        "admin_where_slack": "#channel, or here / none: this channel",
        "admin_autotriage_privacy": (
            "Note: my privacy mode is on, so in a group I see only messages addressed to me unless "
            "I am an admin there: make me an admin of the group, or turn privacy mode off "
            "(@BotFather: /setprivacy, Disable; then remove and add me to the group again)."
        ),
        # support triage (bot/triage/): the reply's note, routed summaries, digest, report
        "triage_seen": "Seen {count} times since {since}, first here: {link}",
        "triage_seen_no_link": "Seen {count} times since {since}.",
        "triage_since_time": "{time} UTC",
        "triage_since_date": "{day} {month} {year}",
        "triage_weekdays": "Monday,Tuesday,Wednesday,Thursday,Friday,Saturday,Sunday",
        "triage_months": "Jan,Feb,Mar,Apr,May,Jun,Jul,Aug,Sep,Oct,Nov,Dec",
        "triage_no_area": "no area",
        "triage_no_error": "no error text",
        "triage_route": "Triage, {severity} in {area}: {error}",
        "triage_route_seen": " (seen {count} times)",
        "triage_route_link": "Original: {link}",
        "triage_route_place": "Posted in {place}",
        "triage_digest_title": "Triage digest, {start} – {end} UTC. Screenshots triaged: {count}",
        "triage_report_title": "Triage report, {start} – {end} UTC. Screenshots triaged: {count}",
        "triage_by_place": "By place: {counts}",
        "triage_by_severity": "By severity: {counts}",
        "triage_by_area": "By product area: {counts}",
        "triage_top_errors": "Most repeated errors:",
        "triage_top_error": "• {error} — {count} times ({area}){first}",
        "triage_first_at": ", first: {link}",
    },
    "zh": {
        "thinking": "思考中…",
        "default_prompt": "用一两句话描述这张图片。",
        "queued": "排队中：第 {ordinal} 位，约 {eta}",
        "queued_position": "排队中：第 {ordinal} 位",
        "busy": "我现在很忙（{queued} 个请求在等待）。请约 {retry_s} 秒后再试。",
        "failed": "抱歉，处理失败，请重试。（编号 {ref}）",
        "timeout": "抱歉，处理时间过长已停止，请重试。（编号 {ref}）",
        "cancelled": "已取消。",
        "nothing_to_cancel": "没有可以取消的任务。",
        "export_empty": "本对话还没有保存任何内容。",
        "reset_done": "好的，我已忘记本对话的历史。",
        "empty_question": "请发送一张图片，或就你发过的图片提问。",
        "no_image_yet": "请先发送照片或图片文件，然后再提问。",
        "send_an_image": "请发送照片或图片文件（JPEG、PNG、WebP、GIF、BMP、TIFF、HEIC）。",
        "too_many_images": "你发送了 {count} 张图片；我一次最多处理 {limit} 张。",
        "question_too_long": "问题长度为 {length} 个字符，上限为 {limit}。",
        "not_allowed": "抱歉，这是一个私有机器人。",
        "quota_images": "你今天已使用 {used} 张图片（上限 {limit} 张），无法再接收这些图片。额度将于 {resets} 重置。",
        "quota_requests": "你今天的 {limit} 次请求已全部用完。额度将于 {resets} 重置。",
        "quota_engine": "你今天已使用 {used} 秒模型时间（上限 {limit} 秒）。额度将于 {resets} 重置。",
        "quota_waiting": "你已有 {used} 个请求在等待（同时最多 {limit} 个）。请等其中一个回答后再发。",
        "rate_limited": "你发送消息太快了，请等待 {retry_s} 秒。",
        "engine_loading": "模型仍在加载中，请稍后再试。",
        "remote_rejected": "模型服务器拒绝了该请求：{reason}",
        "remote_timeout": "模型服务器未能及时回答，请重试。（编号 {ref}）",
        "remote_unavailable": "模型服务器暂时不可用，请稍后再试。（编号 {ref}）",
        "remote_busy": "模型服务器正忙，请一分钟后再试。（编号 {ref}）",
        "answer_interrupted": "模型服务器中断了这个回答，上面的文字不完整，请重新提问。（编号 {ref}）",
        "empty_answer": "模型没有给出回答，请换个方式提问。",
        "empty_file": "该文件是空的。",
        "too_large": "该文件为 {size}，上限为 {limit}。",
        "not_an_image": "该文件不是我能读取的图片。请发送照片或图片文件。",
        "unsupported_format": "不支持 {format} 格式。请发送 JPEG、PNG、WebP 或 HEIC。",
        "image_too_large_pixels": "该图片为 {width}×{height} 像素，超过了 {limit_mp} 百万像素的上限。",
        "corrupt_image": "该图片已损坏或不完整：图像数据有误或被截断，我无法读取。",
        "image_too_large_declared": "该图片文件头声明的尺寸远超 {limit_mp} 百万像素的上限：文件要么过大，要么已损坏，所以我没有读取它。",
        "ocr_no_text": "这张图片中没有找到文字。",
        "engine_fallback_ocr": "提示：本服务器没有可用的视觉语言模型，我只能用 OCR 回答：即图片中识别到的文字。",
        "preset_invalid_output": (
            "抱歉，模型的回答不符合 {preset} 格式，重试一次后仍然如此。请再试一次，或不使用预设直接提问。"
            "（编号 {ref}）"
        ),
        "preset_needs_vlm": (
            "{preset} 预设需要视觉语言模型，而本服务器只运行 OCR。请使用 /ocr，或不使用预设直接提问。"
        ),
        "presets_help": (
            "预设（写在问题前或图片说明中）：/describe、/ocr、/extract（或 /receipt、/invoice、"
            "/form、/menu）、/triage。"
        ),
        "pf_nothing_found": "什么也没有找到。",
        "pf_redacted": "已隐去",
        "pf_merchant": "商家",
        "pf_address": "地址",
        "pf_date": "日期",
        "pf_time": "时间",
        "pf_subtotal": "小计",
        "pf_tax": "税",
        "pf_tip": "小费",
        "pf_total": "合计",
        "pf_payment_method": "支付方式",
        "pf_invoice_number": "发票号",
        "pf_seller": "销售方",
        "pf_buyer": "购买方",
        "pf_issue_date": "开票日期",
        "pf_due_date": "到期日",
        "pf_payment_terms": "付款条件",
        "pf_severity": "严重程度",
        "pf_severity_blocker": "阻断",
        "pf_severity_major": "严重",
        "pf_severity_minor": "轻微",
        "pf_product_area": "产品区域",
        "pf_error_message": "错误信息",
        "pf_error_code": "错误代码",
        "pf_user_action": "用户当时在",
        "pf_likely_cause": "可能原因",
        "pf_next_step": "下一步",
        "pf_personal_data": "个人信息",
        "pf_pii_email": "邮箱",
        "pf_pii_card": "银行卡号",
        "pf_pii_phone": "电话号码",
        "help": (
            "给我发送照片或截图并提问：上面写了什么、收据有哪些字段、一句话总结。"
            "可以就同一张图片继续追问。\n"
            "命令：/ask <问题> 提问（群组中也可以提及我），/export 以文件导出本对话，"
            "/reset 清除本对话历史，/cancel 停止当前回答。\n"
            "预设（写在问题前或照片说明中）：{presets}。\n"
            "模型：{model}。图片最大 {limit}。"
        ),
        "unknown_command": "我不认识命令 /{command}。可用命令：{commands}。预设：{presets}。",
        "slack_working": "处理中…",
        "slack_files_scope": (
            "无法下载该文件：Slack 返回了登录页面而不是图片。应用需要 files:read 权限："
            "请在 OAuth & Permissions（或 manifest.yml）中添加该权限，重新安装应用，然后再次发送图片。"
        ),
        "slack_download_failed": "无法从 Slack 下载 {name}（{status}）。请重新上传。",
        "slack_file_no_url": (
            "无法下载 {name}：Slack 没有给我它的下载链接。外部文件（Google Drive、Dropbox 等）"
            "和机器人无权访问的文件会这样。请把图片本身上传到 Slack（拖入消息框或粘贴），然后再问一次。"
        ),
        "slack_skipped_files": "我跳过了 {names}：只能读取图片（JPEG、PNG、WebP、GIF、BMP、TIFF、HEIC）。",
        "slack_link_not_https": "我只打开 https:// 图片链接；{url} 不是。",
        "slack_link_failed": "无法使用图片链接 {url}：{reason}",
        "invalid_text": "你的消息包含无效的文本字符（损坏的 Unicode 序列），我无法读取。请重新输入或粘贴。",
        "slack_attach_hint": (
            "在这个对话中没有找到图片。请在这里上传截图（拖入消息框或粘贴），"
            "然后再次运行 {command} <问题>，或在带图片的消息中提及我。"
        ),
        "slack_not_in_channel": "我无法读取这个频道。请先邀请我：/invite @vlbot，然后再试一次。",
        "slack_continued": "（续）",
        "slack_follow_ups_all": "在该话题中回复即可继续追问",
        "slack_follow_ups_mention": "在该话题中提及我即可继续追问",
        "slack_help": (
            "在带截图的消息中提及我，我会在该消息的话题中回答；{follow_ups}。"
            "在私信中直接发送图片即可。\n"
            "{command} <问题> 针对本频道最新的图片或你附上的图片链接（Slack 文件链接、https:// 网址）提问，{command} reset 清除本对话，"
            "{command} help 显示本帮助。\n"
            "模型：{model}。图片最大 {limit}。"
        ),
        "admin_only": "抱歉，只有本机器人的管理员可以使用 {command}。没有做任何更改。",
        "admin_allowed": "完成：{who} 现在可以使用本机器人。",
        "admin_denied": "完成：{who} 不能再使用本机器人。",
        "admin_quota_set": "完成：{who} 的配额现在为 {limits}，立即生效。",
        "admin_extra_argument": "此处不应有 {arg}。",
        "admin_who_missing": "{command} 需要指明对象。",
        "admin_quota_empty": "要设置哪些限制？请以 名称=数字 的形式至少给出 {names} 中的一个。",
        "admin_not_a_setting": "{arg} 不是限制设置：请写成 名称=数字（{names}）。",
        "admin_unknown_limit": "{arg}：没有名为 {name} 的限制（可用的限制：{names}）。",
        "admin_limit_twice": "{name} 给出了两次。",
        "admin_negative": "{arg}：限制不能为负数。",
        "admin_not_a_number": "{arg} 不是数字。",
        "admin_not_whole": "{arg} 不是整数。",
        "admin_too_large": "{arg} 太大了（最多 {limit}）。",
        "admin_bad_days": "{arg} 不是天数（1 到 {limit}）。",
        "admin_bad_target": "{arg} 不是我能识别的用户或群组。",
        "admin_slack_plain_mention": (
            "{arg} 以纯文本而不是提及的形式到达：请从 Slack 的提示中选择用户或频道，或为该命令开启"
            "“Escape channels, users, and links”（manifest.yml 中的 should_escape: true）。"
        ),
        "admin_not_me": "那是我，不是用户。",
        "admin_who_telegram": "对象：回复其消息，或给出用户 id（数字）、群组的 chat id（负数）或 here（本对话）",
        "admin_who_slack": "对象：@某人、#频道 或 here（本频道）",
        "admin_usage_allow": "用法：{command} 对象（{who}）。",
        "admin_usage_deny": "用法：{command} 对象（{who}）。",
        "admin_usage_quota": (
            "用法：{command} 对象 images=20 requests=50 engine=600 waiting=2（可任选；engine 以秒计；{who}）。"
        ),
        "admin_usage_usage": "用法：{command} [对象] [天数]（{who}）。",
        "admin_usage_others": "抱歉，只有管理员可以查看他人的用量。单独使用 /usage 可查看你自己的用量。",
        "admin_used_today": "你今天（UTC）的用量：{requests} 个请求，{images} 张图片，{engine} 秒引擎时间；当前 {waiting} 个在等待。",
        "admin_exempt": "你是管理员：不受任何限制。",
        "admin_limit_images": "图片",
        "admin_limit_requests": "请求",
        "admin_limit_engine": "引擎秒数",
        "admin_limit_waiting": "等待中的任务",
        "admin_no_limit": "{name}：无限制",
        "admin_left_item": "{name}：剩余 {left}，共 {limit}",
        "admin_left_today": "剩余：{items}。",
        "admin_resets": "每日计数在 {reset} 重置。",
        "admin_limit_default": "{name}：默认",
        "admin_per_day": "{name} 每天 {value}",
        "admin_seconds_per_day": "{name} 每天 {value}",
        "admin_at_once": "{name} 同时 {value}",
        "admin_report_of": "（{who}）",
        "admin_report_head": (
            "最近 {days} 天（{since} 至 {until}，UTC）的用量{whom}：{requests} 个请求，{images} 张图片，"
            "{engine} 秒引擎时间；已回答 {answered}，失败 {failed}，已取消 {cancelled}，被拒绝 {rejected}。"
        ),
        "admin_report_first_token": "首个 token 用时：p50 {p50} 秒，p95 {p95} 秒。",
        "admin_report_no_first_token": "首个 token 用时：尚无记录。",
        "admin_report_top_users": "用量最多的用户：",
        "admin_report_top_chats": "用量最多的对话：",
        "admin_report_top_line": "{rank}. {who}：{requests} 个请求，{images} 张图片，{engine} 秒",
        "admin_report_images_per_day": "每日图片数：{days}。",
        "admin_report_none": "无",
        "admin_label_user": "{platform} 用户 {id}",
        "admin_label_chat": "{platform} 对话 {id}",
        "admin_label_key": "API 密钥 {id}",
        "admin_label_telegram_user": "用户 {id}",
        "admin_label_telegram_chat": "对话 {id}",
        "admin_help": (
            "管理员：/allow 对象、/deny 对象、/quota 对象 images=20 requests=50 engine=600 "
            "waiting=2、/usage [对象] [天数]（对象：回复其消息、用户 id、群组 chat id 或 here）；"
            "在群组中发送 /autotriage on|off（或 /autotriage 群组id on|off）：发到该群组的每张图片"
            "无需提及即自动分诊。更改立即生效并记录在案。"
        ),
        "admin_slack_help": (
            "管理员：{command} allow 对象、{command} deny 对象、{command} quota 对象 images=20 "
            "requests=50 engine=600 waiting=2、{command} usage [对象] [天数]（对象：@某人、#频道 或 here）、"
            "{command} autotriage #频道|here on|off（发到该频道的每张图片无需提及即自动分诊）。"
            "更改立即生效并记录在案。"
        ),
        "admin_usage_help": "/usage 显示你今天的用量以及各项限制的剩余。",
        "admin_slack_usage_help": "{command} usage 显示你今天的用量以及各项限制的剩余。",
        "admin_autotriage_on": "完成：{where} 已开启自动分诊。从现在起，发到那里的每张图片无需提及都会被分诊。",
        "admin_autotriage_off": "完成：{where} 已关闭自动分诊。",
        "admin_autotriage_already_off": "{where} 未开启自动分诊。没有做任何更改。",
        "admin_autotriage_settings_on": "{where} 已开启自动分诊：它在设置中（{setting}）。没有做任何更改。",
        "admin_autotriage_settings_off": (
            "{where} 的自动分诊来自设置（{setting}），不能在聊天中关闭：请将其从 {setting} 中删除并"
            "重启 vlbot。没有做任何更改。"
        ),
        "admin_autotriage_state_settings": "{where} 已开启自动分诊：它在设置中（{setting}）。",
        "admin_autotriage_state_admin": "{where} 已开启自动分诊：由 {who} 开启（UTC {when}）。",
        "admin_autotriage_state_off": "{where} 未开启自动分诊（{command} on 可开启）。",
        "admin_autotriage_bad_switch": "{arg}：请写 on 或 off。",
        "admin_autotriage_not_a_chat": "{arg} 是用户：自动分诊只用于群组或频道。",
        "admin_autotriage_not_group": "自动分诊只用于群组或频道，不用于私聊：请在那里发送命令，或指明它。",
        "admin_usage_autotriage": "用法：{command} [位置] [on|off]（位置：{who}；不带 on 或 off：显示是否开启及原因）。",
        "admin_where_telegram": "群组的 chat id（负数），不写则为本群组",
        "admin_where_slack": "#频道，或 here / 不写：本频道",
        "admin_autotriage_privacy": (
            "注意：我的隐私模式已开启，因此在群组中我只能看到发给我的消息，除非我是该群组的管理员："
            "请将我设为群组管理员，或关闭隐私模式（@BotFather：/setprivacy，Disable；然后将我移出群组再重新加入）。"
        ),
        "triage_seen": "自{since}以来已出现 {count} 次，首次在这里：{link}",
        "triage_seen_no_link": "自{since}以来已出现 {count} 次。",
        "triage_since_time": "UTC {time} ",
        "triage_since_date": "{year}年{month}{day}日",
        "triage_weekdays": "周一,周二,周三,周四,周五,周六,周日",
        "triage_months": "1月,2月,3月,4月,5月,6月,7月,8月,9月,10月,11月,12月",
        "triage_no_area": "未知区域",
        "triage_no_error": "无错误信息",
        "triage_route": "分诊：{area}出现{severity}问题：{error}",
        "triage_route_seen": "（已出现 {count} 次）",
        "triage_route_link": "原消息：{link}",
        "triage_route_place": "来自 {place}",
        "triage_digest_title": "分诊日报（UTC {start} – {end}）：共 {count} 张截图",
        "triage_report_title": "分诊报告（UTC {start} – {end}）：共 {count} 张截图",
        "triage_by_place": "按位置：{counts}",
        "triage_by_severity": "按严重程度：{counts}",
        "triage_by_area": "按产品区域：{counts}",
        "triage_top_errors": "重复最多的错误：",
        "triage_top_error": "• {error} — {count} 次（{area}）{first}",
        "triage_first_at": "，首次：{link}",
    },
}


def language_of(language_code: str | None) -> str:
    if language_code and language_code.lower().replace("_", "-").startswith("zh"):
        return "zh"
    return "en"


def text(key: str, language_code: str | None = None, **params: Any) -> str:
    lang = language_of(language_code)
    template = CATALOGUE[lang].get(key) or CATALOGUE["en"][key]
    try:
        return template.format(**params)
    except (KeyError, IndexError, ValueError):
        return template


def ordinal(n: int, language_code: str | None = None) -> str:
    if language_of(language_code) == "zh":
        return str(n)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def duration(seconds: float, language_code: str | None = None) -> str:
    s = max(1, round(seconds))
    zh = language_of(language_code) == "zh"
    if s < 90:
        return f"{s} 秒" if zh else f"{s} s"
    m = round(s / 60)
    return f"{m} 分钟" if zh else f"{m} min"


def queued(position: int, eta_s: float | None, language_code: str | None = None) -> str:
    """The place-in-line label; with an estimate only once jobs have been timed (eta_s None)."""
    place = ordinal(position, language_code)
    if eta_s is None:
        return text("queued_position", language_code, ordinal=place)
    return text("queued", language_code, ordinal=place, eta=duration(eta_s, language_code))
